#!/usr/bin/env bash
# Failback through the DR service, on 127.0.0.1, with the CA the service creates itself:
#   1. failback-server starts (SQLite + CA + admin token in its data dir)
#   2. `failback token create agent`; failback-agent enrolls with it and serves a 256 MiB
#      "recovery instance" disk (certificate issued by the service, scoped to the instance)
#   3. `failback token create pairing`; failback-client run pairs (one-time token), gets the
#      device mapping and a client certificate, runs the initial sync (the local disk is a
#      stale copy: only changed blocks move) and keeps delta rounds going
#   4. the instance shows FAILBACK_READY_FOR_LAUNCH / CONTINUOUS; `failback launch` from the CLI
#   5. final round, digests compared on both sides, FAILBACK_COMPLETED, client exits 0; the
#      digests and the event log are shown, and cmp checks every byte.
# The web console URL and an operator credential are printed when the service starts; on a
# terminal the service stays up DEMO_CONSOLE_SECS (120) at the end to look at the instance.
# Work dir: target/demo-service (removed at the end unless DEMO_KEEP=1). BIN_DIR defaults to
# target/release (falls back to target/debug). DEMO_SIZE (default 256M).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${DEMO_DIR:-$ROOT/target/demo-service}
BIN=${BIN_DIR:-$ROOT/target/release}
SIZE=${DEMO_SIZE:-256M}
[ -x "$BIN/failback-server" ] || BIN=$ROOT/target/debug

die() { echo "demo-service: $*" >&2; exit 1; }
for b in failback-server failback-agent failback-client failback fb-gendisk; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (run: cargo build --release --bins)"
done
command -v jq >/dev/null || die "jq not found (run make setup)"

rm -rf "$DIR"
mkdir -p "$DIR"
PIDS=()
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ $rc != 0 ]; then
        echo "demo-service: FAILED (exit $rc); logs:" >&2
        for f in "$DIR"/*.log; do echo "--- $f" >&2; tail -20 "$f" >&2; done
    fi
    [ "${DEMO_KEEP:-0}" = 1 ] || rm -rf "$DIR"
    exit $rc
}
trap cleanup EXIT INT TERM

step() { printf '\n== %s\n' "$*"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    for _ in $(seq $((secs * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "timed out waiting for $what"
}

step "disks: recovery volume ($SIZE) and a stale local copy (3 % of blocks changed)"
"$BIN/fb-gendisk" "$DIR/recovery-volume.img" --size "$SIZE" --random-pct 45 --text-pct 20 --seed 1 >/dev/null
"$BIN/fb-gendisk" "$DIR/local-disk.img" --stale-from "$DIR/recovery-volume.img" --change-pct 3 --seed 9 >/dev/null
ls -lh "$DIR"/*.img | awk '{print "  " $5 "  " $9}'

step "start the DR service (failback-server serve)"
export FAILBACK_ADMIN_TOKEN=demo-admin-token
"$BIN/failback-server" serve --data-dir "$DIR/data" --listen 127.0.0.1:0 --addr-file "$DIR/addr" \
    --heartbeat-secs 1 --agent-timeout-secs 5 --client-timeout-secs 10 --block-size 65536 \
    >"$DIR/server.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the service to listen" test -s "$DIR/addr"
export FAILBACK_SERVER="https://$(cat "$DIR/addr")"
export FAILBACK_CA="$DIR/data/ca.pem"
echo "  $FAILBACK_SERVER (CA $FAILBACK_CA)"
CONSOLE_SECRET=$("$BIN/failback" credentials create --role operator --name demo-operator --output json | jq -r .secret)
echo "  web console: $FAILBACK_SERVER/console  (log in with operator credential $CONSOLE_SECRET)"
echo "  (the service's certificate is from its own CA $FAILBACK_CA: accept it in the browser)"

step "agent enrollment token; the recovery agent enrolls"
AGENT_TOKEN=$("$BIN/failback" token create agent)
echo "  failback token create agent -> ${AGENT_TOKEN:0:12}..."
"$BIN/failback-agent" serve --listen 127.0.0.1:0 --disk "disk0=$DIR/recovery-volume.img" \
    --server "$FAILBACK_SERVER" --enroll-token "$AGENT_TOKEN" --ca "$FAILBACK_CA" \
    --state-dir "$DIR/agent-state" >"$DIR/agent.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the agent to enroll" grep -q "as recovery instance" "$DIR/agent.log"
ID=$(grep -o 'as recovery instance .*' "$DIR/agent.log" | awk '{print $4}')
"$BIN/failback" instances list

step "one-time pairing token for $ID; failback-client run pairs and syncs"
PAIR_TOKEN=$("$BIN/failback" token create pairing --instance "$ID")
echo "  failback token create pairing --instance $ID -> ${PAIR_TOKEN:0:12}..."
"$BIN/failback-client" run --server "$FAILBACK_SERVER" --token "$PAIR_TOKEN" --ca "$FAILBACK_CA" \
    --map "disk0=$DIR/local-disk.img" --delta-interval-secs 2 >"$DIR/client.log" 2>&1 &
CLIENT=$!
PIDS+=($CLIENT)
ready() {
    "$BIN/failback" instances describe "$ID" --output json |
        jq -e '.failback.state == "FAILBACK_READY_FOR_LAUNCH" and .failback.replication_state == "CONTINUOUS"'
}
wait_for 300 "FAILBACK_READY_FOR_LAUNCH / CONTINUOUS" ready
grep '^failback:' "$DIR/client.log" | sed 's/^/  /'
"$BIN/failback" instances list

step "launch from the CLI: failback launch $ID"
"$BIN/failback" launch "$ID"
for _ in $(seq 1500); do kill -0 "$CLIENT" 2>/dev/null || break; sleep 0.2; done
rc=0
wait "$CLIENT" || rc=$?
[ $rc = 0 ] || die "client exited with $rc"
grep -E '^failback: (launch|agent quiesced|round .* final|round .*done|FAILBACK_COMPLETED|  disk0)' "$DIR/client.log" | tail -6 | sed 's/^/  /'

step "result"
"$BIN/failback" instances describe "$ID" | grep -E 'failback state|replication state|digest'
"$BIN/failback" instances describe "$ID" --output json |
    jq -e '.failback.state == "FAILBACK_COMPLETED" and (.failback.digests | length > 0) and
           all(.failback.digests[]; .local_digest == .agent_digest)' >/dev/null ||
    die "digests missing or different"
cmp "$DIR/recovery-volume.img" "$DIR/local-disk.img" || die "local disk differs from the recovery volume"
echo "  cmp: local disk == recovery volume, byte for byte"

step "event log"
"$BIN/failback" events --instance "$ID" | grep -vE 'INITIATION_STEP' | tail -20
echo
echo "demo-service: OK"
# The console keeps showing the demo's instance (COMPLETED, digests, events, charts) until the
# service stops: DEMO_CONSOLE_SECS (default 120 on a terminal, 0 otherwise).
CONSOLE_SECS=${DEMO_CONSOLE_SECS:-$([ -t 0 ] && echo 120 || echo 0)}
if [ "$CONSOLE_SECS" -gt 0 ]; then
    echo "web console: $FAILBACK_SERVER/console  credential: $CONSOLE_SECRET"
    echo "  (instance $ID stays visible for ${CONSOLE_SECS}s; Ctrl-C ends the demo)"
    sleep "$CONSOLE_SECS" || true
fi
