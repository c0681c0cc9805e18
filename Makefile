# failback: setup, demo, test, iso, bench. Every target works from a clean checkout as root
# on Debian 12; `demo` and `test` run `setup` first (it is quick once done).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

# Debian packages the tests and tools need. qemu-system-x86 removes the preinstalled
# qemu-utils 10 backport, so qemu-utils is pinned to bookworm in the same apt line.
APT_PACKAGES := qemu-system-x86 qemu-utils/bookworm ovmf golang-go golang-github-vmware-govmomi-dev \
	xorriso nbdkit libnbd-bin rsync socat musl-tools cpio jq dosfstools mtools fdisk e2fsprogs mount

VCSIM := target/vcsim/vcsim
HYPERVISOR := target/hypervisor/hypervisor

.PHONY: setup demo demo-service demo-sync test bench iso clean fmt lint fuzz
setup: target/.setup-apt $(VCSIM) $(HYPERVISOR) iso-inputs
	@rustup target list --installed | grep -q x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl

# Debian packages the appliance ISO is built from (iso-builder/packages.lock), unpacked into
# target/iso-inputs so that ISO builds and tests need no network.
.PHONY: iso-inputs
iso-inputs:
	@bash iso-builder/fetch-inputs.sh target/iso-inputs

target/.setup-apt: Makefile
	@mkdir -p target
	@missing=0; for p in qemu-system-x86_64 qemu-img xorriso nbdkit nbdcopy rsync socat go musl-gcc cpio jq mkfs.vfat mcopy sfdisk mkfs.ext4 losetup swapon partx; do \
		command -v $$p >/dev/null || missing=1; done; \
	[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] || missing=1; \
	[ -f /usr/share/OVMF/OVMF_CODE_4M.ms.fd ] || missing=1; \
	if [ $$missing = 1 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades $(APT_PACKAGES); \
	fi
	@touch $@

# vcsim: govmomi's vCenter simulator, from Debian's library plus our launcher (tests/vcsim).
$(VCSIM): target/.setup-apt $(wildcard tests/vcsim/*.go)
	@if [ -f tests/vcsim/main.go ]; then mkdir -p $(dir $@) && \
		cd tests/vcsim && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(CURDIR)/target/vcsim/gocache \
		go build -o $(CURDIR)/$@ . ; fi

# hypervisor: boots QEMU for vcsim VMs that power on from an ISO (tests/hypervisor, e2e tests).
$(HYPERVISOR): target/.setup-apt $(wildcard tests/hypervisor/*.go)
	@mkdir -p $(dir $@) && cd tests/hypervisor && GO111MODULE=off GOPATH=/usr/share/gocode \
		GOCACHE=$(CURDIR)/target/vcsim/gocache go build -o $(CURDIR)/$@ .

# The demo: (1) the DR-service flow (pairing token, sync, READY, launch, COMPLETED), then
# (2) the raw engine on two 1 GiB disks with progress bars. `demo-service` / `demo-sync` run one.
demo: setup
	$(CARGO) build --release --bins
	bash scripts/demo-service.sh
	bash scripts/demo.sh

demo-service: setup
	$(CARGO) build --release --bins
	bash scripts/demo-service.sh

demo-sync: setup
	$(CARGO) build --release --bins
	bash scripts/demo.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: setup lint
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

# Longer fuzzing than the bounded pass in `make test`: FUZZ_CASES cases per fuzz test.
FUZZ_CASES ?= 20000
fuzz:
	FAILBACK_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test -p failback-replication --test fuzz_wire --test fuzz_protocol
	FAILBACK_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test -p failback-config --test fuzz_parsers --test fuzz_api

bench: setup
	$(CARGO) build --release --bins
	bash scripts/bench.sh

iso: setup
	bash scripts/iso.sh

clean:
	$(CARGO) clean
