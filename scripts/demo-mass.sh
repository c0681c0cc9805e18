#!/usr/bin/env bash
# `make demo-mass`: a whole mass failback on one machine, without a vCenter.
#   1. vcsim (govmomi's vCenter simulator; 4 VMs, datastore LocalDS_0) and the DR service
#   2. three recovery agents on this host, each serving a recovery instance that holds a real
#      bootable test OS (generation v2, `fb-testos`) and naming a vcsim VM's BIOS UUID
#   3. the test hypervisor (target/hypervisor/hypervisor): when a vcsim VM powers on from the
#      appliance ISO it boots QEMU with that ISO, the VM's seed ISO and the VM's "own disk"
#      (DIR/disks/<vm>.img: the stale v1 for the first VM, empty for the others); when the VM
#      later powers on from its disk, it boots QEMU from that disk (the restored OS)
#   4. `failback mass find`, `failback mass plan --one-click`, `failback mass run` as you would
#      type them; the fourth VM has no recovery instance and is reported as skipped
#   5. each VM's restored OS prints its marker (generation, SHA-256 of its own files, root
#      device) on its serial console; the demo prints it and checks it against the v2 disk.
# QEMU guests reach the host as 10.0.2.2 (QEMU user networking): the agents advertise
# 10.0.2.2:PORT and the seeds point at https://10.0.2.2:PORT (the service's certificate has
# that SAN). Every process is stopped on exit. Work dir: target/demo-mass (removed at the end
# unless DEMO_KEEP=1). BIN_DIR defaults to target/release; FAILBACK_APPLIANCE_ISO to
# target/failback.iso (`make iso`); DEMO_DATA_MIB (16) MiB of files per test OS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${DEMO_DIR:-$ROOT/target/demo-mass}
BIN=${BIN_DIR:-$ROOT/target/release}
ISO=${FAILBACK_APPLIANCE_ISO:-$ROOT/target/failback.iso}
DATA_MIB=${DEMO_DATA_MIB:-16}
DISK_MIB=$((DATA_MIB * 2 + 128))
VCSIM=$ROOT/target/vcsim/vcsim
HYPERVISOR=$ROOT/target/hypervisor/hypervisor
T0=$(date +%s)

die() { echo "demo-mass: $*" >&2; exit 1; }
for b in failback-server failback-agent failback fb-testos; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (run: cargo build --release --bins)"
done
[ -x "$VCSIM" ] && [ -x "$HYPERVISOR" ] || die "vcsim or the test hypervisor missing (run: make setup)"
[ -f "$ISO" ] || die "appliance ISO $ISO missing (run: make iso)"
for t in jq qemu-system-x86_64 python3; do command -v $t >/dev/null || die "$t not found (run make setup)"; done

rm -rf "$DIR"
mkdir -p "$DIR/disks" "$DIR/vcsim-tmp"
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # The hypervisor stops its QEMUs when it gets SIGTERM; then the rest.
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ $rc != 0 ]; then
        echo "demo-mass: FAILED (exit $rc); logs:" >&2
        for f in "$DIR"/*.log "$DIR"/disks/*.log; do
            [ -f "$f" ] && { echo "--- $f" >&2; tail -25 "$f" >&2; }
        done
    fi
    [ "${DEMO_KEEP:-0}" = 1 ] || rm -rf "$DIR"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }
# Prints a command as typed (binaries from $BIN are on PATH), then runs it.
run() { printf '$ %s\n' "$*"; "$@"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    for _ in $(seq $((secs * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "timed out waiting for $what"
}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
export PATH="$BIN:$PATH" NO_COLOR=1

step "test OS disks: a bootable BIOS system (kernel, busybox init, ${DATA_MIB} MiB of files), generations v1 and v2"
mapfile -t V1 < <(fb-testos --boot bios --generation 1 --data-mib "$DATA_MIB" --disk-mib "$DISK_MIB")
mapfile -t V2 < <(fb-testos --boot bios --generation 2 --data-mib "$DATA_MIB" --disk-mib "$DISK_MIB")
echo "  v1: ${V1[0]}"
echo "  v2: ${V2[0]}"
echo "  v2 prints: ${V2[1]} root=..."

step "vcsim (vCenter simulator): 4 VMs, datastore LocalDS_0"
TMPDIR="$DIR/vcsim-tmp" "$VCSIM" -l 127.0.0.1:0 -env-file "$DIR/vcsim.env" -vm 2 -host 1 \
    </dev/null >"$DIR/vcsim.log" 2>&1 &
PIDS+=($!)
wait_for 60 "vcsim to listen" test -s "$DIR/vcsim.env"
vc_var() { grep "^$1=" "$DIR/vcsim.env" | cut -d= -f2-; }
export VCENTER_HOST="https://127.0.0.1:$(vc_var VCSIM_PORT)/sdk"
export VCENTER_USER=$(vc_var VCSIM_USERNAME) VCENTER_PASSWORD=$(vc_var VCSIM_PASSWORD)
export VCENTER_DATASTORE=LocalDS_0 DISABLE_SSL_VERIFICATION=true
echo "  $VCENTER_HOST (user $VCENTER_USER; datastore LocalDS_0 is the directory $(vc_var VCSIM_DATASTORE_LOCALDS_0))"

step "DR service (failback-server serve; certificate also valid for 10.0.2.2, the host as QEMU guests see it)"
export FAILBACK_ADMIN_TOKEN=demo-admin-token
failback-server serve --data-dir "$DIR/data" --listen 127.0.0.1:0 --addr-file "$DIR/addr" \
    --san 10.0.2.2 --heartbeat-secs 2 >"$DIR/server.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the service to listen" test -s "$DIR/addr"
export FAILBACK_SERVER="https://$(cat "$DIR/addr")" FAILBACK_CA="$DIR/data/ca.pem"
SEED_URL="https://10.0.2.2:${FAILBACK_SERVER##*:}"
echo "  $FAILBACK_SERVER (the appliances reach it as $SEED_URL)"

step "the VMs in vCenter"
run failback mass find
mapfile -t VMS < <(failback mass find --output json | jq -r '.vms | sort_by(.name) | .[:3][] | "\(.name) \(.bios_uuid)"')
[ ${#VMS[@]} = 3 ] || die "vcsim has fewer than 3 VMs"

step "recovery side: one agent per VM, serving the v2 test OS (the system to fail back)"
i=0
for vm in "${VMS[@]}"; do
    read -r name uuid <<<"$vm"
    cp --sparse=always "${V2[0]}" "$DIR/recovery-$name.img"
    if [ $i = 0 ]; then
        cp --sparse=always "${V1[0]}" "$DIR/disks/$name.img"
        own="its own disk holds the stale v1 (delta sync)"
    else
        truncate -s "${DISK_MIB}M" "$DIR/disks/$name.img"
        own="its own disk is empty (full sync)"
    fi
    port=$(free_port)
    token=$(failback token create agent 2>>"$DIR/cli.log")
    failback-agent serve --listen "127.0.0.1:$port" --advertise "10.0.2.2:$port" \
        --disk "disk0=$DIR/recovery-$name.img" --server "$FAILBACK_SERVER" --ca "$FAILBACK_CA" \
        --enroll-token "$token" --state-dir "$DIR/agent-$name" --source-vmware-uuid "$uuid" \
        >"$DIR/agent-$name.log" 2>&1 &
    PIDS+=($!)
    echo "  agent for $name (BIOS UUID $uuid) on 127.0.0.1:$port, advertised as 10.0.2.2:$port; $own"
    i=$((i + 1))
done
enrolled() { [ "$(failback instances list --output json | jq '.items | length')" = 3 ]; }
wait_for 60 "the three agents to enroll" enrolled
run failback instances list

step "the test hypervisor boots QEMU for vcsim VMs (ISO power-on: the appliance; disk power-on: the restored OS)"
"$HYPERVISOR" -vcsim-env "$DIR/vcsim.env" -disk-dir "$DIR/disks" -boot-disks \
    >"$DIR/hypervisor.log" 2>"$DIR/hypervisor.err" &
PIDS+=($!)
wait_for 30 "the hypervisor" grep -q '^ready' "$DIR/hypervisor.log"
echo "  consoles: $DIR/disks/<vm>.serial.log (appliance), <vm>.disk.serial.log (restored OS)"

step "find, plan, dry run, run (in $DIR)"
cd "$DIR"
iso=$(realpath --relative-to="$DIR" "$ISO")
run failback mass find
run failback mass plan --one-click -o plan.toml
echo "--- plan.toml, its first entry (one [[vm]] per VM; edit it before the run if needed):"
awk '/^\[\[vm\]\]/ {n++} n == 1' plan.toml | grep -v '^$' | sed 's/^/  /'
run failback mass run plan.toml --dry-run --appliance-iso "$iso" --seed-server-url "$SEED_URL"
T_RUN=$(date +%s)
run failback mass run plan.toml --parallel 3 --poll-ms 1000 --appliance-iso "$iso" \
    --seed-server-url "$SEED_URL" --results results.json --progress plain
cd "$ROOT"
T_DONE=$(date +%s)
echo "--- results ($DIR/results.json)"
jq -r '.vms[] | "  \(.vm_name // .vm): \(.status)" + (if .status == "succeeded"
    then "; \(.disk_bytes / 1048576 | floor) MiB disk, \((.differing_bytes // 0) / 104857.6 | floor / 10) MiB differed, \((.fetched_bytes // 0) / 104857.6 | floor / 10) MiB fetched"
    else " (\(.message // ""))" end)' "$DIR/results.json"
jq -e '.summary.succeeded == 3' "$DIR/results.json" >/dev/null || die "not every VM succeeded: $(jq -c .summary "$DIR/results.json")"

step "each VM boots its restored OS (console of its power-on from disk)"
for vm in "${VMS[@]}"; do
    read -r name _ <<<"$vm"
    want="${V2[1]} root=/dev/vda2"
    con="$DIR/disks/$name.disk.serial.log"
    # The whole line (a line can arrive in pieces).
    has_marker() { tr -d '\r' <"$con" | grep -qxF "$want"; }
    wait_for 600 "the restored-OS marker of $name in $con" has_marker
    echo "  $name: $(tr -d '\r' <"$con" | grep -xF "$want")"
done
echo
echo "  every VM runs the v2 system it was failed back to (same content checksum as the recovery instance's)"
echo "  mass run: $((T_DONE - T_RUN)) s; whole demo: $(($(date +%s) - T0)) s"
echo
echo "demo-mass: OK"
