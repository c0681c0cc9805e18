#!/usr/bin/env bash
# `make iso`: fetch the pinned Debian inputs (cached), build the static musl client, build the
# appliance ISO with the admin CLI, print its size. Output: target/failback.iso (override: ISO_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${ISO_OUT:-target/failback.iso}"
bash iso-builder/fetch-inputs.sh target/iso-inputs
# Stripped: the client sits in the initramfs, which lives in RAM.
CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --target x86_64-unknown-linux-musl -p failback-client
cargo build --release -p failback-orchestrator --bin failback
target/release/failback iso build --cache target/iso-inputs \
	--client target/x86_64-unknown-linux-musl/release/failback-client -o "$out"
ls -l "$out" | awk '{printf "ISO size: %d bytes (%.1f MiB)\n", $5, $5/1048576}'
