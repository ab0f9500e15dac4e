#!/usr/bin/env bash
# The committed baseline: one full `make bench` (3 runs x 4 MTUs, 10 s
# iperf3 runs; about 35 minutes) as the unprivileged test user, written to
# bench/results/ with bench/results/README.md in front of it, and the rows
# of README.md's summary table printed from the JSON. Run it as root (it
# switches users; scripts/test-setup.sh first) on a quiet machine of the
# project's kind; then look at the figures, edit README.md's table and
# commit bench/results. BENCH_* variables pass through (e.g. BENCH_RUNS=1
# for a rehearsal), as does RESULTS=DIR to write elsewhere; the committed
# one names every default system and gonetns-nopoll in BENCH_SYSTEMS.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${RESULTS:-bench/results}
make -s build bench-tools >&2
CGO_ENABLED=0 go build -trimpath -o bin/gonetns-bench ./bench
dir=$(mktemp -d /tmp/gonetns-bench-baseline-XXXXXX)
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/tools" "$dir/out"
cp bin/gonetns bin/gonetns-bench "$dir"/
[ -x bin/tools/rootlesskit ] && cp bin/tools/rootlesskit "$dir/tools/"
chmod -R a+rX "$dir"
chown gonetns-test "$dir/out"
commit=$(git describe --tags --always --dirty 2>/dev/null || echo unknown)
pass=()
for v in BENCH_SECONDS BENCH_RUNS BENCH_MTUS BENCH_SYSTEMS BENCH_MEASUREMENTS; do
	if [ -n "${!v:-}" ]; then pass+=("$v=${!v}"); fi
done
(cd "$dir" && runuser -u gonetns-test -- env BENCH_OUT="$dir/out" BENCH_GONETNS="$dir/gonetns" \
	BENCH_ROOTLESSKIT3="$dir/tools/rootlesskit" "${pass[@]}" \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$dir/gonetns-bench" >/dev/null)
md=$(ls "$dir"/out/*.md)
name=$(basename "$md" .md)
mkdir -p "$results"
cp "$dir/out/$name".{md,json,svg} "$results/"
{
	echo "# gonetns benchmark baseline: 2-core machine, $(date -u '+%Y-%m-%d %H:%M') UTC"
	echo
	echo "The committed baseline: one full \`make bench\` (scripts/bench-baseline.sh) run as the"
	echo "unprivileged test user on a machine of this project's kind, at commit $commit."
	echo "Raw samples: [$name.json]($name.json)."
	echo
	echo "![Throughput by MTU and system]($name.svg)"
	echo
	echo "Round trips and new connections: what stands between them and the peers on this"
	echo "machine is measured in [docs/design.md](../../docs/design.md#the-tcp-fast-path) (the"
	echo "profile, the event loop, busy polling); \`gonetns --busy-poll=0\` (the loop never"
	echo "polling; by default it polls on this machine) is in the tables when \`BENCH_SYSTEMS\`"
	echo "names \`gonetns-nopoll\`."
	echo
	tail -n +2 "$md"
} >"$results/README.md"
echo "wrote $results/README.md and $results/$name.{md,json,svg}" >&2
# README.md's summary table, from the medians.
python3 - "$results/$name.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
cell = {}
for s in d["summary"]:
    cell[(s["system"], s.get("mtu", 0), s["measurement"], s["value"])] = s["summary"]
mtus = d["config"]["mtus"]
lo, hi = min(mtus), max(mtus)
systems = [("gonetns", "gonetns-port"), ("slirp4netns", "rootlesskit-builtin"), ("pasta", "pasta-port"), ("gvisor-tap-vsock", None)]
rows = [
    ("TCP sandbox → host, MTU %d" % lo, lo, "tcp_c2h", "gbps", "%.3g Gbit/s"),
    ("TCP sandbox → host, MTU %d" % hi, hi, "tcp_c2h", "gbps", "%.3g Gbit/s"),
    ("TCP host → sandbox, MTU %d" % hi, hi, "tcp_h2c", "gbps", "%.3g Gbit/s"),
    ("published port (`-p`), host → sandbox", hi, "port_h2c", "gbps", "%.3g Gbit/s"),
    ("TCP request/response p50, MTU %d / %d" % (lo, hi), None, "probe", "rr_p50_us", "%.0f µs"),
    ("new TCP connections per second, MTU %d / %d" % (lo, hi), None, "probe", "conn_per_s", "%.0f"),
    ("UDP round trip p50, MTU %d / %d" % (lo, hi), None, "probe", "udp_p50_us", "%.0f µs"),
    ("UDP goodput under a flood (-b 0, 1400 B)", lo, "udp_c2h", "mbps", "%.0f Mbit/s"),
    ("start-up of `true`", lo, "startup", "startup_ms", "%.0f ms"),
]
def fmt(sysname, mtu, kind, key, f):
    c = cell.get((sysname, mtu, kind, key))
    return (f % c["median"]) if c and c["n"] else "–"
print("| | gonetns | RootlessKit + slirp4netns | pasta | RootlessKit v3 gvisor-tap-vsock |")
print("| --- | ---: | ---: | ---: | ---: |")
for label, mtu, kind, key, f in rows:
    out = []
    for plain, port in systems:
        name = port if kind.startswith("port_") else plain
        if name is None:
            out.append("–")
        elif mtu is None:
            out.append(fmt(name, lo, kind, key, f) + " / " + fmt(name, hi, kind, key, f))
        else:
            out.append(fmt(name, mtu, kind, key, f))
    print("| %s | %s |" % (label, " | ".join(out)))
PY
