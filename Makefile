# gonetns: see README.md.
GO      ?= go
PREFIX  ?= /usr/local
BIN     := bin/gonetns
# The version is gonetns's base version and the commit (from the build's
# VCS information); VERSION=x.y.z overrides it.
LDFLAGS := -s -w $(if $(VERSION),-X main.version=$(VERSION))

.PHONY: build test test-setup test-teardown install install-rootlesskit install-slirp4netns clean

# A static binary: CGO_ENABLED=0, no helper binaries needed at run time.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -buildvcs=auto -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/gonetns

# Everything CI runs: machine setup (as root; idempotent), vet, unit tests
# with the race detector (and the allocation counts without it: its
# sync.Pool drops items at random), end-to-end tests of the real binary as an
# unprivileged user and as root. On the way out, pass, fail or Ctrl-C,
# scripts/test-teardown.sh puts back what the setup changed for the run
# (services, sysctls, /dev/net/tun's mode; README.md, "Testing").
test:
	trap './scripts/test-teardown.sh' EXIT; trap 'exit 130' INT TERM; \
	set -e; \
	./scripts/test-setup.sh; \
	$(GO) vet ./...; \
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v /cmd/gonetns); \
	$(GO) test -count=1 -run Allocs $$($(GO) list ./... | grep -v /cmd/gonetns); \
	$(GO) test -count=1 -timeout 30m ./cmd/gonetns

# The setup alone, and its undoing (both as root).
test-setup:
	./scripts/test-setup.sh

test-teardown:
	./scripts/test-teardown.sh

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/gonetns

# gonetns under RootlessKit's names (it speaks the command line argv[0]
# names), for dockerd-rootless.sh, containerd-rootless.sh and BuildKit.
install-rootlesskit: install
	for n in rootlesskit rootlessctl rootlesskit-docker-proxy; do \
		ln -sf gonetns $(DESTDIR)$(PREFIX)/bin/$$n; done

# gonetns as slirp4netns, off PATH (the system's slirp4netns stays what
# programs find there): Podman, Buildah and RootlessKit 1.x are pointed at
# it (network_cmd_path, --slirp4netns-binary; docs/slirp4netns.md).
install-slirp4netns: install
	install -d $(DESTDIR)$(PREFIX)/libexec/gonetns
	ln -sf ../../bin/gonetns $(DESTDIR)$(PREFIX)/libexec/gonetns/slirp4netns

clean:
	rm -rf bin

# The benchmark harness (bench/README.md): builds gonetns and the harness,
# then compares gonetns with slirp4netns, pasta and RootlessKit as the
# invoking user (root or not). Knobs from the environment: BENCH_SECONDS,
# BENCH_RUNS, BENCH_MTUS, BENCH_QUICK=1 (CI: 1 s, 1 run, MTU 65520),
# BENCH_SYSTEMS, BENCH_OUT. BENCH_NO_BUILD=1 runs what bin/ already holds,
# e.g. built by root and run by an unprivileged user. Only the table goes
# to stdout; the build and the progress go to stderr.
BENCH_BIN := bin/gonetns-bench
# RootlessKit v3 (for its gvisor-tap-vsock network) goes into a tools
# directory of the benchmark's own, never over the system's rootlesskit.
BENCH_TOOLS := bin/tools
RK3_MODULE  := github.com/rootless-containers/rootlesskit/v3/cmd/rootlesskit@v3.0.1

.PHONY: bench bench-quick bench-tools bench-baseline
# CI's quick run, as the unprivileged test user (needs root and test-setup).
bench-quick:
	./scripts/bench-quick.sh

# The committed baseline (bench/results/README.md) and README.md's table,
# as the unprivileged test user (needs root and test-setup).
bench-baseline:
	./scripts/bench-baseline.sh

# A peer that cannot be installed (no module proxy) is reported missing by
# the harness; it does not stop the benchmark.
bench-tools:
	@test -x $(BENCH_TOOLS)/rootlesskit || { echo "GOBIN=$(CURDIR)/$(BENCH_TOOLS) $(GO) install $(RK3_MODULE)" >&2; \
		GOBIN=$(CURDIR)/$(BENCH_TOOLS) $(GO) install $(RK3_MODULE) >&2 || \
		echo "bench-tools: RootlessKit v3 could not be installed; the benchmark reports it missing" >&2; }

bench:
ifeq ($(BENCH_NO_BUILD),)
	@$(MAKE) --no-print-directory build bench-tools >&2
	@echo "CGO_ENABLED=0 $(GO) build -trimpath -o $(BENCH_BIN) ./bench" >&2
	@CGO_ENABLED=0 $(GO) build -trimpath -o $(BENCH_BIN) ./bench
endif
	@./$(BENCH_BIN)
