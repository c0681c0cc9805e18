#!/usr/bin/env bash
# `make demo`: a failback round trip on this machine, on 127.0.0.1, with real certificates.
#   1. two ~1 GiB "recovery instance" disks (random data, zero runs, repeated log text)
#   2. local targets: a stale copy of disk 1 (3 % of its 64 KiB blocks changed) and an empty disk 2
#   3. certificates from a private CA (failback-agent dev-certs), an agent serving both disks
#   4. failback-client sync pulls only what differs, with progress bars, and both sides attest
#      the whole-disk digests; then cmp checks every byte, and a second round fetches nothing.
# Everything lives under target/demo and is removed at the end, also on failure or Ctrl-C.
# Environment: DEMO_SIZE (default 1G), DEMO_DIR (default target/demo), BIN_DIR (target/release),
# DEMO_KEEP=1 keeps the work dir.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_ARG=${DEMO_SIZE:-1G}
DIR=${DEMO_DIR:-$ROOT/target/demo}
BIN=${BIN_DIR:-$ROOT/target/release}

die() { echo "demo: $*" >&2; exit 1; }
for b in fb-gendisk failback-agent failback-client; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (run: cargo build --release --bins)"
done
for tool in jq cmp numfmt; do
    command -v "$tool" >/dev/null || die "$tool not found (run make setup)"
done
SIZE=$(numfmt --from=iec "$SIZE_ARG") || die "bad DEMO_SIZE $SIZE_ARG"
need=$((SIZE * 4 + (256 << 20)))
have=$(df --output=avail -B1 "$(dirname "$DIR")" | tail -1)
[ "$have" -ge "$need" ] || die "need $(numfmt --to=iec $need) free for $DIR, have $(numfmt --to=iec "$have")"

rm -rf "$DIR"
mkdir -p "$DIR/remote" "$DIR/local"
AGENT_PID=""
cleanup() {
    local rc=$?
    if [ -n "$AGENT_PID" ]; then
        kill "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    if [ $rc != 0 ]; then
        echo "demo: FAILED (exit $rc)" >&2
        [ -f "$DIR/agent.log" ] && { echo "--- agent log (last lines):" >&2; tail -15 "$DIR/agent.log" >&2; }
    fi
    if [ "${DEMO_KEEP:-0}" = 1 ]; then echo "demo: kept $DIR"; else rm -rf "$DIR"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
human() { numfmt --to=iec-i --suffix=B --format=%.1f "$1"; }

step "1. recovery-instance disks ($(human "$SIZE") each: random data, zero runs, repeated text)"
"$BIN/fb-gendisk" "$DIR/remote/web-root.img" --size "$SIZE" --random-pct 45 --text-pct 20 --seed 1 |
    jq -r '"   web-root: \(.random_bytes) random, \(.text_bytes) text, \(.zero_bytes) zero bytes (\(.zero_runs) zero runs)"'
"$BIN/fb-gendisk" "$DIR/remote/web-data.img" --size "$SIZE" --random-pct 30 --text-pct 35 --seed 2 |
    jq -r '"   web-data: \(.random_bytes) random, \(.text_bytes) text, \(.zero_bytes) zero bytes (\(.zero_runs) zero runs)"'

step "2. local disks of the original VM: a stale copy of web-root, an empty disk for web-data"
CHANGED=$("$BIN/fb-gendisk" "$DIR/local/disk0.img" --stale-from "$DIR/remote/web-root.img" \
    --change-pct 3 --block 65536 --seed 3 | jq .changed_bytes)
echo "   disk0.img: stale copy, $CHANGED bytes ($(human "$CHANGED")) changed since the failover"
truncate -s "$SIZE" "$DIR/local/disk1.img"
echo "   disk1.img: empty ($(human "$SIZE") of zeros)"

step "3. certificates from a private CA, agent on 127.0.0.1"
"$BIN/failback-agent" dev-certs "$DIR/certs" >/dev/null
ls "$DIR/certs" | sed 's/^/   /'
# Port 0: the agent binds a free port and prints `listening on ADDR` on stdout.
"$BIN/failback-agent" serve --listen 127.0.0.1:0 --scan-rate 0 \
    --disk "web-root=$DIR/remote/web-root.img" --disk "web-data=$DIR/remote/web-data.img" \
    --ca "$DIR/certs/ca.pem" --cert "$DIR/certs/agent.pem" --key "$DIR/certs/agent-key.pem" \
    >"$DIR/agent.out" 2>"$DIR/agent.log" &
AGENT_PID=$!
for _ in $(seq 300); do
    grep -q '^listening on ' "$DIR/agent.out" && break
    kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited: $(tail -5 "$DIR/agent.log")"
    sleep 0.1
done
addr=$(sed -n 's/^listening on //p' "$DIR/agent.out" | head -1)
[ -n "$addr" ] || die "agent did not report its address within 30 s"
echo "   failback-agent serving web-root, web-data on $addr (pid $AGENT_PID)"

client() { # ROUND REPORT
    "$BIN/failback-client" sync --agent "$addr" \
        --map "web-root=$DIR/local/disk0.img" --map "web-data=$DIR/local/disk1.img" \
        --ca "$DIR/certs/ca.pem" --cert "$DIR/certs/client.pem" --key "$DIR/certs/client-key.pem" \
        --report "$2"
}
summary() { # REPORT
    echo "   per disk, from the client's JSON report ($(basename "$1")):"
    printf '   %-9s %-10s %-10s %-10s %-10s %-7s %s\n' disk size differing fetched "on wire" time "whole-disk digest (client = agent)"
    jq -r '.disks[] | [.remote_id, .size, .bytes_differing, .bytes_fetched, .bytes_on_wire,
        "\(.duration_secs * 10 | round / 10)s",
        "\(.digest) \(if .digest == .agent_digest then "MATCH" else "MISMATCH agent \(.agent_digest)" end)"] | @tsv' "$1" |
        while IFS=$'\t' read -r id size diff fetched wire secs digest; do
            printf '   %-9s %-10s %-10s %-10s %-10s %-7s %s\n' "$id" "$(human "$size")" "$(human "$diff")" \
                "$(human "$fetched")" "$(human "$wire")" "$secs" "$digest"
        done
    jq -e 'all(.disks[]; .digest == .agent_digest)' "$1" >/dev/null || die "whole-disk digests differ"
}

step "4. failback-client sync: pull only the differing blocks (mutual TLS)"
client 1 "$DIR/report1.json"
summary "$DIR/report1.json"

step "5. byte-for-byte check (cmp)"
cmp "$DIR/remote/web-root.img" "$DIR/local/disk0.img" && echo "   disk0.img == web-root: identical"
cmp "$DIR/remote/web-data.img" "$DIR/local/disk1.img" && echo "   disk1.img == web-data: identical"

step "6. a second round (as during continuous replication): nothing left to fetch"
client 2 "$DIR/report2.json"
summary "$DIR/report2.json"
fetched=$(jq '[.disks[].bytes_fetched] | add' "$DIR/report2.json")
[ "$fetched" = 0 ] || die "second round fetched $fetched bytes, expected 0"

step "done: both disks restored and attested; cleaning up"
