#!/bin/sh
# The REST API under a burst, with the server short of CPU (docs/limits.md
# has the figures). As root, from the repository:
#
#   scripts/api-burst/run.sh bin/gonetns [PAIRS] [BUSY] [IDLE]
#
# runs gonetns as the test user gonetns-test, pinned to CPU 0 with BUSY
# busy loops (default 8) beside it; inside, IDLE connections (default 0)
# are held open by idle.py, then burst.py (on CPU 1) makes PAIRS (default
# 1000) concurrent add+delete pairs and prints how many were answered and
# how many ports are left. Ports 21000+ on 127.0.0.1 are used. Hold the
# machine's e2e lock: flock /tmp/gonetns-e2e.lock scripts/api-burst/run.sh ...
set -eu
bin=$(realpath "$1"); pairs=${2:-1000}; busy=${3:-8}; idle=${4:-0}
dir=$(realpath "$(dirname "$0")")
pids=""
for i in $(seq "$busy"); do timeout 300 taskset -c 0 sh -c 'while :; do :; done' & pids="$pids $!"; done
trap 'kill $pids 2>/dev/null || true' EXIT
inside='
if [ "$IDLE" -gt 0 ]; then
  /usr/bin/python3 "$DIR/idle.py" "$ROOTLESSKIT_STATE_DIR/api.sock" "$IDLE" > "$ROOTLESSKIT_STATE_DIR/idle.out" & held=$!
  until grep -q held "$ROOTLESSKIT_STATE_DIR/idle.out" 2>/dev/null; do sleep 0.2; done
fi
taskset -c 1 /usr/bin/python3 "$DIR/burst.py" "$ROOTLESSKIT_STATE_DIR/api.sock" "$PAIRS" 21000
"$BIN" ctl info | grep -A3 Limits || true
if [ "$IDLE" -gt 0 ]; then kill $held; rm -f "$ROOTLESSKIT_STATE_DIR/idle.out"; fi'
su gonetns-test -s /bin/sh -c "DIR='$dir' BIN='$bin' PAIRS='$pairs' IDLE='$idle' prlimit --nofile=1024:20000 -- taskset -c 0 '$bin' sh -c '$inside'"
