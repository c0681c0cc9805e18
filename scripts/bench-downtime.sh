#!/usr/bin/env bash
# `make bench` (or `make bench-downtime`): failback downtime, from `failback launch` to the
# restored OS's marker on the VM's console, per test OS size (tests/benches/restored_os_downtime.rs:
# DR service + agent + the appliance ISO in QEMU TCG, UEFI + virtio, `after = "reboot"`).
# BENCH_DOWNTIME_MIB (default "16 64 256"): MiB of files per test OS; the disk is 2x + 128 MiB.
# Output: the table on stdout; one JSON line per size in target/bench/downtime.json.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/bench
echo "== failback downtime: failback launch -> restored OS marker (sizes: ${BENCH_DOWNTIME_MIB:-16 64 256} MiB of files)"
cargo build -q --workspace --bins
cargo test -q -p failback-tests --bench restored_os_downtime | tee target/bench/downtime.out
grep '^{"downtime"' target/bench/downtime.out >target/bench/downtime.json
rm -f target/bench/downtime.out
