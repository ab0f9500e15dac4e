#!/usr/bin/env bash
# The TCP fast path's soak: 30 minutes (SOAK_DURATION) of mixed TCP traffic
# through one sandbox, as the unprivileged test user: round trips, new
# connections, 64 MiB transfers both ways checked with sha256, slow
# readers, resets, half-closes, against servers on the host's 127.0.0.1.
# The gonetns parent's RSS, private memory and descriptors are sampled
# every 30 s (SOAK_SAMPLE) under traffic and again at a quiet point (the
# traffic paused, no connection open); the run fails if, at the quiet
# points, private memory or descriptors grow beyond the first minute's
# peak, or if a transfer goes wrong; it also says when private memory at
# the quiet points last rose and how many quiet points held since (a leak
# rises to the end). Extra gonetns flags: SOAK_FLAGS (e.g.
# --tcp-fast-path=false to soak the netstack's TCP). Not part of make
# test. Needs root (it switches users); run scripts/test-setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
dir=$(mktemp -d /tmp/gonetns-soak-XXXXXX)
trap 'rm -rf "$dir"' EXIT
CGO_ENABLED=0 go build -trimpath -o "$dir/gonetns" ./cmd/gonetns
CGO_ENABLED=0 go build -trimpath -o "$dir/soak" ./bench/soak
chmod 0755 "$dir" "$dir/gonetns" "$dir/soak"
cd "$dir"
# shellcheck disable=SC2086 # SOAK_FLAGS is a list of flags
runuser -u gonetns-test -- "$dir/soak" -gonetns "$dir/gonetns" -duration "${SOAK_DURATION:-30m}" -sample "${SOAK_SAMPLE:-30s}" \
	-- --mtu=65520 ${SOAK_FLAGS:-}
