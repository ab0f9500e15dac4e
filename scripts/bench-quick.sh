#!/usr/bin/env bash
# CI's run of the benchmark harness: quick mode (1 s runs, 1 repeat, MTU
# 65520), as the unprivileged test user so that every peer (RootlessKit
# needs subordinate ids) runs. It installs what the harness compares with
# and the machine setup does not (RootlessKit v3, from the Go module proxy,
# into bin/tools: make bench-tools); a peer that is missing is reported in
# the table, not fatal. It fails only if the harness fails, never on a
# figure. Needs root (it switches users); run scripts/test-setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s build bench-tools >&2
CGO_ENABLED=0 go build -trimpath -o bin/gonetns-bench ./bench
dir=$(mktemp -d /tmp/gonetns-bench-quick-XXXXXX)
trap 'rm -rf "$dir"' EXIT
cp bin/gonetns bin/gonetns-bench "$dir"/
chmod 0755 "$dir"/gonetns "$dir"/gonetns-bench
mkdir "$dir/tools"
if [ -x bin/tools/rootlesskit ]; then
	cp bin/tools/rootlesskit "$dir/tools/rootlesskit"
	chmod 0755 "$dir/tools/rootlesskit"
fi
chmod 0755 "$dir/tools"
mkdir "$dir/results"
chown gonetns-test "$dir/results"
chmod 0755 "$dir"
cd "$dir"
runuser -u gonetns-test -- env BENCH_QUICK=1 BENCH_OUT="$dir/results" BENCH_GONETNS="$dir/gonetns" \
	BENCH_ROOTLESSKIT3="$dir/tools/rootlesskit" \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$dir/gonetns-bench"
