#!/usr/bin/env bash
# What idle connections cost the network process: the sandbox opens
# IDLE_CONNS (1,000) TCP connections to a server on the host's 127.0.0.1,
# each echoes one byte, and then nothing moves for IDLE_SECONDS (60). The
# gonetns parent's CPU time (utime+stime of /proc/PID/stat) and the times
# its threads were scheduled (/proc/PID/task/*/schedstat) are read at the
# start and the end of the quiet period, with the TCP fast path on (with
# its event loop, the default, with and without busy polling, and
# without the loop) and off,
# as the unprivileged test user. An idle connection should cost nothing:
# no timer, no wake-up. Not part of make test. Needs root (it switches
# users); run scripts/test-setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
conns=${IDLE_CONNS:-1000}
secs=${IDLE_SECONDS:-60}
dir=$(mktemp -d /tmp/gonetns-idle-XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
CGO_ENABLED=0 go build -trimpath -o "$dir/gonetns" ./cmd/gonetns
chmod 0755 "$dir" "$dir/gonetns"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# The host's server: echoes each connection's byte, then holds it.
python3 - "$port" <<'EOF' &
import selectors, socket, sys
sel = selectors.DefaultSelector()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(4096)
sel.register(ls, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            c, _ = ls.accept()
            sel.register(c, selectors.EVENT_READ)
        else:
            try:
                b = key.fileobj.recv(1)
                if b:
                    key.fileobj.send(b)
            except OSError:
                b = b""
            if not b:
                sel.unregister(key.fileobj)
                key.fileobj.close()
EOF
for _ in $(seq 100); do
	(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
	sleep 0.05
done

# The sandbox's client: opens the connections, says "ready", holds them.
cat >"$dir/client.py" <<'EOF'
import socket, sys, time
conns = []
for i in range(int(sys.argv[2])):
    try:
        c = socket.create_connection(("10.0.2.2", int(sys.argv[1])))
    except OSError as e:
        sys.exit(f"connection {i}: {e}")
    c.sendall(b"x")
    assert c.recv(1) == b"x"
    conns.append(c)
print("ready", flush=True)
time.sleep(int(sys.argv[3]) + 30)
EOF
chmod 0644 "$dir/client.py"

cpu() { # utime+stime of $1 in clock ticks, and the times its threads ran
	local ticks runs=0 f
	ticks=$(awk '{print $14+$15}' "/proc/$1/stat")
	for f in /proc/"$1"/task/*/schedstat; do
		runs=$((runs + $(awk '{print $3}' "$f" 2>/dev/null || echo 0)))
	done
	echo "$ticks $runs"
}

hz=$(getconf CLK_TCK)
printf '%-26s %12s %14s %10s\n' "gonetns" "CPU ms/${secs}s" "wake-ups/${secs}s" "RSS MB"
for flags in "--tcp-fast-path=true" "--busy-poll=0" "--event-loop=false" "--tcp-fast-path=false"; do
	fifo="$dir/out$RANDOM"
	mkfifo "$fifo"
	chmod 0666 "$fifo"
	runuser -u gonetns-test -- "$dir/gonetns" --mtu=65520 "$flags" python3 "$dir/client.py" "$port" "$conns" "$secs" >"$fifo" &
	pid=$!
	read -r line <"$fifo"
	[ "$line" = ready ] || { echo "idle-cost: the sandbox's client did not get ready: $line" >&2; exit 1; }
	gpid=$(pgrep -P "$pid" -x gonetns || echo "$pid") # runuser's child
	read -r t0 r0 <<<"$(cpu "$gpid")"
	sleep "$secs"
	read -r t1 r1 <<<"$(cpu "$gpid")"
	rss=$(awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$gpid/status")
	printf '%-26s %12d %14d %10s\n' "$flags ($conns conns)" $(((t1 - t0) * 1000 / hz)) $((r1 - r0)) "$rss"
	kill "$gpid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
done
