#!/usr/bin/env bash
# `make bench`, change-block tracking section (issue 16): rounds cost what changed, not the
# disk size. As root (loop device, eBPF tracker, drop_caches), through the DR service:
#   1. a sparse SIZE image (default 64G) with DATA (default SIZE/8) of random data written, on a
#      loop device; the agent serves the loop device (tracking on), the client (`run`) syncs it
#      into a sparse image file: initial sync, then continuous delta rounds.
#   2. a writer writes 0.1 % and then 1 % of the 64 KiB blocks at random (O_DIRECT) while the
#      rounds run; per case: the wall time of the round(s) that carried the change and the bytes
#      the agent read (read_bytes of /proc/PID/io: what it made the block layer read, not rchar).
#   3. the agent restarts -> the next round hash-compares the whole disk (RESCAN): same figures.
#   4. a writer races (RACE_MB MB/s of 4-64 KiB direct writes) and 64 MiB more are written
#      right before `failback launch`; the agent's quiesce command stops the writer (every
#      write it made is on the device when it returns); the final round and launch ->
#      FAILBACK_COMPLETED are timed; cmp checks target == source.
# Page cache: dropped (echo 3 > /proc/sys/vm/drop_caches) before every measured round, so the
# agent's reads come from the device, not from memory.
# Environment: BENCH_CBT_SIZE (64G), BENCH_CBT_DATA (SIZE/8), BENCH_CBT_DIR (target/bench-cbt),
# BENCH_CBT_INTERVAL (seconds between delta rounds, 4), BENCH_CBT_RACE_MB (4), BIN_DIR
# (target/release). Output: the table and PASS/MISS lines; BENCH_CBT_DIR/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN_DIR:-$ROOT/target/release}
DIR=${BENCH_CBT_DIR:-$ROOT/target/bench-cbt}
INTERVAL=${BENCH_CBT_INTERVAL:-4}
RACE_MB=${BENCH_CBT_RACE_MB:-4}
BLOCK=65536
WRITER="python3 $ROOT/scripts/bench-cbt-writer.py"
PIDS=()
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

[ "$(id -u)" = 0 ] || die "the change-tracking bench needs root (losetup, eBPF, drop_caches)"
for t in losetup jq cmp numfmt python3 truncate; do command -v "$t" >/dev/null || die "$t not found"; done
for b in failback-server failback-agent failback-client failback fb-gendisk; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (run: cargo build --release --bins)"
done
SIZE=$(numfmt --from=iec "${BENCH_CBT_SIZE:-64G}") || die "bad BENCH_CBT_SIZE"
DATA=$(numfmt --from=iec "${BENCH_CBT_DATA:-$((SIZE / 8))}") || die "bad BENCH_CBT_DATA"
[ $((SIZE % BLOCK)) = 0 ] && [ "$DATA" -le "$SIZE" ] || die "size must be a multiple of 64 KiB, data <= size"
NBLOCKS=$((SIZE / BLOCK))

rm -rf "$DIR"
mkdir -p "$DIR"
# Space: the written data on the source and on the target, what the writers add, slack.
need=$((DATA * 2 + SIZE / 25 + (1 << 30)))
have=$(df --output=avail -B1 "$DIR" | tail -1)
[ "$have" -ge "$need" ] || die "need $(numfmt --to=iec $need) free under $DIR, have $(numfmt --to=iec "$have")"

LOOP=""
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    [ -z "$LOOP" ] || losetup -d "$LOOP" || true
    if [ $rc != 0 ]; then
        echo "bench-cbt: FAILED (exit $rc); logs:" >&2
        for f in "$DIR"/*.log; do echo "--- $f" >&2; tail -15 "$f" >&2; done
    fi
    rm -f "$DIR"/*.img
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    for _ in $(seq $((secs * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "timed out waiting for $what"
}
read_bytes() { awk '$1 == "read_bytes:" {print $2}' "/proc/$1/io"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
LOG=$DIR/client.log
rounds_done() { grep -c 'round [0-9]* done in' "$LOG" || true; }
# round_line N: the N-th "round ... done" line of the client log.
round_line() { grep 'round [0-9]* done in' "$LOG" | sed -n "${1}p"; }
round_secs() { sed -E 's/.* done in ([0-9.]+)s.*/\1/' <<<"$1"; }
round_kind() { sed -E 's/.* done in [0-9.]+s \(([a-z]+)\).*/\1/' <<<"$1"; }
round_mib() { sed -E 's/.*: ([0-9.]+) MiB differed.*/\1/' <<<"$1"; }
# wait_rounds N: until N rounds are done in total.
wait_rounds() {
    for _ in $(seq 36000); do
        [ "$(rounds_done)" -ge "$1" ] && return 0
        kill -0 "$CLIENT" 2>/dev/null || die "the client exited (see $LOG)"
        sleep 0.1
    done
    die "round $1 did not finish"
}

echo "== source: $(numfmt --to=iec "$SIZE") sparse image with $(numfmt --to=iec "$DATA") of random data, on a loop device"
SRC=$DIR/source.img
"$BIN/fb-gendisk" "$SRC" --size "$DATA" --random-pct 100 --seed 16 >/dev/null
truncate -s "$SIZE" "$SRC"
LOOP=$(losetup -f --show "$SRC")
DST=$DIR/target.img
truncate -s "$SIZE" "$DST"
echo "   $LOOP -> $DST"

echo "== DR service, agent (enrolled, tracking $LOOP), client run (delta rounds every ${INTERVAL}s)"
export FAILBACK_ADMIN_TOKEN=bench-admin-token
"$BIN/failback-server" serve --data-dir "$DIR/data" --listen 127.0.0.1:0 --addr-file "$DIR/addr" \
    --heartbeat-secs 1 --agent-timeout-secs 30 --client-timeout-secs 60 --block-size $BLOCK \
    >"$DIR/server.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the service to listen" test -s "$DIR/addr"
export FAILBACK_SERVER="https://$(cat "$DIR/addr")"
export FAILBACK_CA="$DIR/data/ca.pem"
AGENT_TOKEN=$("$BIN/failback" token create agent)
APORT=$(free_port)
RACE_OUT=$DIR/race.out
# Quiesce = stop the racing writer and wait until it has exited (it prints its byte count last).
QUIESCE="if [ -s $DIR/race.pid ]; then kill -TERM \$(cat $DIR/race.pid); while [ ! -s $RACE_OUT ]; do sleep 0.01; done; fi"
start_agent() {
    "$BIN/failback-agent" serve --listen "127.0.0.1:$APORT" --disk "disk0=$LOOP" \
        --server "$FAILBACK_SERVER" --enroll-token "$AGENT_TOKEN" --ca "$FAILBACK_CA" \
        --state-dir "$DIR/agent-state" --quiesce-cmd "$QUIESCE" >>"$DIR/agent.log" 2>&1 &
    AGENT=$!
    PIDS+=("$AGENT")
}
start_agent
wait_for 60 "the agent to enroll" grep -q "as recovery instance" "$DIR/agent.log"
wait_for 60 "the agent's tracking status" grep -q "tracking: " "$DIR/agent.log"
grep -q "tracking: on" "$DIR/agent.log" || die "the agent does not track $LOOP: $(grep tracking: "$DIR/agent.log")"
ID=$(grep -o 'as recovery instance .*' "$DIR/agent.log" | head -1 | awk '{print $4}')
PAIR_TOKEN=$("$BIN/failback" token create pairing --instance "$ID")
T0=$(date +%s.%N)
"$BIN/failback-client" run --server "$FAILBACK_SERVER" --token "$PAIR_TOKEN" --ca "$FAILBACK_CA" \
    --map "disk0=$DST" --delta-interval-secs "$INTERVAL" --retry-secs 1 --progress plain >"$LOG" 2>&1 &
CLIENT=$!
PIDS+=("$CLIENT")
wait_rounds 1
INITIAL=$(round_line 1)
echo "   initial sync: $(round_secs "$INITIAL") s ($(round_mib "$INITIAL") MiB differed)"

RESULTS=$DIR/rounds.jsonl
: >"$RESULTS"
# changes_case NAME PCT: after a round ends, the writer writes PCT % of the blocks; measured
# until the first round that started after the writer finished is done (it may be the same).
changes_case() {
    local name=$1 pct=$2 count n0 r0 r1 n1 secs=0 kinds="" mib=0 line i
    count=$(awk -v n="$NBLOCKS" -v p="$pct" 'BEGIN {c = int(n * p / 100 + 0.5); print (c < 1 ? 1 : c)}')
    n0=$(rounds_done)
    wait_rounds $((n0 + 1))
    drop_caches
    n0=$(rounds_done)
    r0=$(read_bytes "$AGENT")
    local bytes
    bytes=$($WRITER burst "$LOOP" "$SIZE" "$count" "$RANDOM")
    # The round running now (if any) may have cut before the last write: wait for the next one.
    n1=$(rounds_done)
    if grep -q "round $((n1 + 1)): delta round" "$LOG"; then wait_rounds $((n1 + 2)); else wait_rounds $((n1 + 1)); fi
    r1=$(read_bytes "$AGENT")
    n1=$(rounds_done)
    for i in $(seq $((n0 + 1)) "$n1"); do
        line=$(round_line "$i")
        secs=$(awk -v a="$secs" -v b="$(round_secs "$line")" 'BEGIN {print a + b}')
        mib=$(awk -v a="$mib" -v b="$(round_mib "$line")" 'BEGIN {print a + b}')
        kinds="$kinds$(round_kind "$line") "
    done
    jq -nc --arg case "$name" --argjson changed "$bytes" --argjson secs "$secs" \
        --argjson read $((r1 - r0)) --argjson rounds $((n1 - n0)) --arg kinds "${kinds% }" \
        --argjson mib "$mib" \
        '{case: $case, changed_bytes: $changed, round_secs: $secs, agent_read_bytes: $read,
          rounds: $rounds, kinds: $kinds, differed_mib: $mib}' | tee -a "$RESULTS" |
        jq -r '"   \(.case): \(.changed_bytes) bytes changed -> \(.rounds) round(s) [\(.kinds)] \(.round_secs) s, agent read \(.agent_read_bytes) bytes, \(.differed_mib) MiB differed"'
}

echo "== changes rounds (writer: 64 KiB blocks at random, O_DIRECT)"
changes_case changes-0.1% 0.1
changes_case changes-1% 1

echo "== rescan: the agent restarts (its tracker knows nothing of the time it was down)"
wait_rounds $(($(rounds_done) + 1))
kill "$AGENT"
wait "$AGENT" 2>/dev/null || true
drop_caches
n0=$(rounds_done)
start_agent
wait_rounds $((n0 + 1))
# The new agent read nothing before this round; rounds after it read only changes (none).
r=$(read_bytes "$AGENT")
line=$(round_line $((n0 + 1)))
[ "$(round_kind "$line")" = compare ] || die "the round after the agent restart was not a hash compare: $line"
jq -nc --arg case rescan --argjson secs "$(round_secs "$line")" --argjson read "$r" \
    --argjson mib "$(round_mib "$line")" \
    '{case: $case, changed_bytes: 0, round_secs: $secs, agent_read_bytes: $read, rounds: 1,
      kinds: "compare", differed_mib: $mib}' | tee -a "$RESULTS" |
    jq -r '"   rescan: 1 round [compare] \(.round_secs) s, agent read \(.agent_read_bytes) bytes"'

echo "== launch with a writer racing until quiesce (${RACE_MB} MB/s) and 64 MiB written just before"
wait_rounds $(($(rounds_done) + 2))
rm -f "$RACE_OUT"
$WRITER race "$LOOP" "$SIZE" "$RACE_MB" "$RANDOM" "$RACE_OUT" &
echo $! >"$DIR/race.pid"
PIDS+=("$!")
sleep "$((INTERVAL + 1))" # racing writes across at least one delta round
n0=$(rounds_done)
wait_rounds $((n0 + 1))
drop_caches
BURST=$($WRITER burst "$LOOP" "$SIZE" 1024 "$RANDOM")
L0=$(date +%s.%N)
"$BIN/failback" launch "$ID" >/dev/null
for _ in $(seq 36000); do kill -0 "$CLIENT" 2>/dev/null || break; sleep 0.05; done
L1=$(date +%s.%N)
rc=0
wait "$CLIENT" || rc=$?
[ $rc = 0 ] || die "client exited with $rc"
"$BIN/failback" instances describe "$ID" --output json | jq -e '.failback.state == "FAILBACK_COMPLETED"' >/dev/null ||
    die "instance $ID is not FAILBACK_COMPLETED"
FINAL=$(grep -A100 'launch requested: final round' "$LOG" | grep -m1 'round [0-9]* done in')
RACED=$(cat "$RACE_OUT")
LAUNCH_SECS=$(awk -v a="$L0" -v b="$L1" 'BEGIN {printf "%.3f", b - a}')
echo "   final round: $(round_secs "$FINAL") s, $(round_mib "$FINAL") MiB differed ($BURST bytes burst + $RACED bytes raced in all)"
echo "   launch -> client exit with FAILBACK_COMPLETED: $LAUNCH_SECS s"
echo "== cmp $LOOP $DST"
CMP=PASS
cmp "$LOOP" "$DST" || CMP=MISS
jq -nc --argjson secs "$(round_secs "$FINAL")" --argjson mib "$(round_mib "$FINAL")" \
    --argjson launch "$LAUNCH_SECS" --arg cmp "$CMP" --argjson raced "$RACED" \
    '{case: "final", round_secs: $secs, differed_mib: $mib, launch_to_completed_secs: $launch,
      cmp: $cmp, raced_bytes: $raced}' >>"$RESULTS"

jq -s --argjson size "$SIZE" --argjson data "$DATA" --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg initial "$(round_secs "$INITIAL")" '
  def c($n): map(select(.case == $n)) | .[0];
  (c("rescan").round_secs) as $rescan | c("changes-0.1%") as $small | c("final") as $final
  | {date: $date, size_bytes: $size, data_bytes: $data, initial_sync_secs: ($initial | tonumber),
     page_cache: "dropped before every measured round", cases: .,
     targets: [
       {name: "0.1 % round time <= 2 % of the rescan round", value: ($small.round_secs / $rescan * 100),
        unit: "%", need: 2, pass: ($small.round_secs <= 0.02 * $rescan)},
       {name: "0.1 % round agent reads <= 2 x changed bytes", value: ($small.agent_read_bytes / $small.changed_bytes),
        unit: "x", need: 2, pass: ($small.agent_read_bytes <= 2 * $small.changed_bytes)},
       {name: "final round with >= 64 MiB dirty <= 2 s", value: $final.round_secs, unit: "s", need: 2,
        pass: ($final.round_secs <= 2 and $final.differed_mib >= 64)},
       {name: "target == source after launch (cmp, writer racing until quiesce)", value: $final.cmp,
        unit: "", need: "PASS", pass: ($final.cmp == "PASS")}]}' "$RESULTS" >"$DIR/results.json"

R=$DIR/results.json
echo
echo "change-block tracking, $(jq -r .date "$R"): $(numfmt --to=iec "$SIZE") loop device, $(numfmt --to=iec "$DATA") written, 64 KiB blocks, page cache dropped before each measured round"
printf '%-14s %8s %10s %14s %12s\n' case rounds "wall s" "agent read MB" "changed MB"
jq -r '.cases[] | select(.case != "final") | [.case, .rounds, .round_secs,
    (.agent_read_bytes / 1e6 * 10 | round / 10), (.changed_bytes / 1e6 * 10 | round / 10)] | @tsv' "$R" |
    while IFS=$'\t' read -r a b c d e; do printf '%-14s %8s %10s %14s %12s\n' "$a" "$b" "$c" "$d" "$e"; done
echo "initial sync $(jq .initial_sync_secs "$R") s; final round $(jq '.cases[] | select(.case == "final") | .round_secs' "$R") s with $(jq '.cases[] | select(.case == "final") | .differed_mib' "$R") MiB differed; launch -> COMPLETED $LAUNCH_SECS s"
jq -r '.targets[] | "\(if .pass then "PASS" else "MISS" end)  \(.name): \(.value | if type == "number" then (. * 100 | round / 100) else . end)\(.unit) (need \(.need)\(.unit))"' "$R"
echo "results: $R"
