# gonetns: see README.md.
GO      ?= go
PREFIX  ?= /usr/local
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
BIN     := bin/gonetns
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: build test test-setup unit e2e install clean

# A static binary: CGO_ENABLED=0, no helper binaries needed at run time.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/gonetns

# Everything CI runs: machine setup (as root; idempotent), vet, unit tests
# with the race detector, end-to-end tests of the real binary as an
# unprivileged user and as root.
test: test-setup
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v /cmd/gonetns)
	$(GO) test -count=1 -timeout 30m ./cmd/gonetns

test-setup:
	./scripts/test-setup.sh

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/gonetns

clean:
	rm -rf bin
