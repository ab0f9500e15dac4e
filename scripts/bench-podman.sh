#!/usr/bin/env bash
# Podman containers on gonetns (as slirp4netns) against Podman containers on
# the real slirp4netns, side by side in one run: Debian 12's Podman 4.3.1 as
# the unprivileged test user, one HOME per system whose containers.conf names
# the slirp4netns to run (network_cmd_path), the same offline busybox image
# (with e2etool) for both, MTU 65520 (Podman's). Rounds alternate between
# the systems; each figure is the median of ROUNDS (default 5) transfers of
# BYTES (default 1 GiB):
#   download  host -> container: the container reads from a host server on
#             127.0.0.1 through 10.0.2.2
#   upload    container -> host, the same way
#   -p in     host -> container through a published port, with Podman's
#             rootlessport and with port_handler=slirp4netns (the API socket)
#   -p out    container -> host through the same ports
# Run as root (it switches to gonetns-test; scripts/test-setup.sh first) on a
# quiet machine; it builds, then holds /tmp/gonetns-e2e.lock while it
# measures. Prints a markdown table; ROUNDS and BYTES change the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-5}
bytes=${BYTES:-1073741824}
user=gonetns-test
export PATH="/usr/local/go/bin:$PATH"

if [ "${1:-}" != --measure ]; then
	# Short paths: Podman's API socket is $XDG_RUNTIME_DIR/libpod/tmp/<64
	# hex digits>.net, and a unix socket's path has room for 107 bytes.
	dir=$(mktemp -d /tmp/gbp-XXXXXX)
	chmod 0755 "$dir"
	trap 'rm -rf "$dir"' EXIT
	echo "building gonetns and e2etool" >&2
	CGO_ENABLED=0 go build -trimpath -o "$dir/bin/gonetns" ./cmd/gonetns
	CGO_ENABLED=0 go build -trimpath -o "$dir/bin/e2etool" ./internal/e2etest/e2etool
	trap - EXIT
	# The measurements hold the lock; the lock's descriptor stays out of
	# what they start (-o), or Podman's pause process would keep it.
	exec flock -o /tmp/gonetns-e2e.lock "$0" --measure "$dir"
fi
dir=$2
cleanup() {
	for sys in gonetns slirp4netns; do
		[ -d "$dir/$sys" ] && as_user "$sys" podman rm --all --force --time=0 >/dev/null 2>&1 || true
		[ -d "$dir/$sys" ] && as_user "$sys" podman unshare rm -rf "$dir/$sys/home/.local/share/containers" >/dev/null 2>&1 || true
	done
	# Podman's pause processes (catatonit) outlive every podman command.
	for p in /proc/[0-9]*; do
		if tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -q "^XDG_RUNTIME_DIR=$dir/r-"; then
			kill -9 "${p#/proc/}" 2>/dev/null || true
		fi
	done
	[ -n "${hostpid:-}" ] && kill "$hostpid" 2>/dev/null || true
	rm -rf "$dir"
}
trap cleanup EXIT

mkdir "$dir/as"
ln -s ../bin/gonetns "$dir/as/slirp4netns"

# The image: busybox-static and its applets, e2etool.
root="$dir/rootfs"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev,run,tmp}
cp /bin/busybox "$dir/bin/e2etool" "$root/bin/"
for a in $(/bin/busybox --list-full); do
	[ "$a" = bin/busybox ] || ln -sf /bin/busybox "$root/$a"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
tar -C "$root" -cf "$dir/rootfs.tar" .
chmod -R a+rX "$dir"

as_user() { # SYSTEM CMD...: run CMD as the test user with SYSTEM's Podman set-up
	local sys=$1
	shift
	runuser -u "$user" -- env -i HOME="$dir/$sys/home" USER=$user LOGNAME=$user LANG=C.UTF-8 \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		XDG_RUNTIME_DIR="$dir/r-${sys:0:1}" XDG_CONFIG_HOME="$dir/$sys/home/.config" \
		XDG_DATA_HOME="$dir/$sys/home/.local/share" TMPDIR="$dir/$sys/tmp" "$@"
}

for sys in gonetns slirp4netns; do
	bin=/usr/bin/slirp4netns
	[ $sys = gonetns ] && bin="$dir/as/slirp4netns"
	mkdir -p "$dir/$sys"/{home/.config/containers,home/.local/share/containers,tmp} "$dir/r-${sys:0:1}"
	cat >"$dir/$sys/home/.config/containers/containers.conf" <<EOF
[engine]
network_cmd_path = "$bin"
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
EOF
	cat >"$dir/$sys/home/.config/containers/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$dir/$sys/home/.local/share/containers/storage"
runroot = "$dir/r-${sys:0:1}/containers"
EOF
	chown -R "$user" "$dir/$sys" "$dir/r-${sys:0:1}"
	chmod 0700 "$dir/r-${sys:0:1}"
	as_user $sys podman import "$dir/rootfs.tar" bench:1 >/dev/null
	echo "$sys: $(as_user $sys podman info --format '{{.Host.Slirp4NetNS.Version}}' | head -1)" >&2
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])'; }
rate() { sed -n 's/.*: \([0-9.]*\) Gbit\/s$/\1/p' | tail -1; }
net="--network=slirp4netns:allow_host_loopback=true"

# measure SYSTEM KIND: one transfer, prints Gbit/s.
measure() {
	local sys=$1 kind=$2 port id out
	port=$(free_port)
	case $kind in
	download)
		"$dir/bin/e2etool" source "127.0.0.1:$port" "$bytes" & hostpid=$!
		sleep 0.2
		out=$(as_user $sys podman run --rm $net bench:1 e2etool recv "10.0.2.2:$port")
		kill $hostpid; wait $hostpid 2>/dev/null || true; hostpid=
		;;
	upload)
		"$dir/bin/e2etool" sink "127.0.0.1:$port" & hostpid=$!
		sleep 0.2
		out=$(as_user $sys podman run --rm $net bench:1 e2etool send "10.0.2.2:$port" "$bytes")
		kill $hostpid; wait $hostpid 2>/dev/null || true; hostpid=
		;;
	port-in-*|port-out-*)
		local handler=${kind#port-*-} extra=()
		[ "$handler" = slirp4netns ] && extra=(--network=slirp4netns:port_handler=slirp4netns)
		if [ "${kind#port-in}" != "$kind" ]; then
			id=$(as_user $sys podman run -d "${extra[@]}" -p "127.0.0.1:$port:8000" bench:1 e2etool sink 0.0.0.0:8000)
		else
			id=$(as_user $sys podman run -d "${extra[@]}" -p "127.0.0.1:$port:8000" bench:1 e2etool source 0.0.0.0:8000 "$bytes")
		fi
		# Ready when the server inside listens (the published port
		# accepts before that).
		for _ in $(seq 100); do
			as_user $sys podman exec "$id" netstat -ltn 2>/dev/null | grep -q ':8000 ' && break
			sleep 0.1
		done
		if [ "${kind#port-in}" != "$kind" ]; then
			out=$("$dir/bin/e2etool" send "127.0.0.1:$port" "$bytes")
		else
			out=$("$dir/bin/e2etool" recv "127.0.0.1:$port")
		fi
		as_user $sys podman rm --force --time=0 "$id" >/dev/null
		;;
	esac
	echo "$out" | rate
}

kinds="download upload port-in-rootlessport port-out-rootlessport port-in-slirp4netns port-out-slirp4netns"
declare -A samples
for round in $(seq "$rounds"); do
	for kind in $kinds; do
		for sys in gonetns slirp4netns; do
			# Alternate which system goes first.
			[ $((round % 2)) = 0 ] && sys=$([ $sys = gonetns ] && echo slirp4netns || echo gonetns)
			v=$(measure $sys $kind)
			samples[$sys,$kind]+="$v "
			echo "round $round $kind $sys: $v Gbit/s" >&2
		done
	done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3g\n", (a[NR/2]+a[NR/2+1])/2}'; }
range() { tr ' ' '\n' | grep . | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {print lo "–" hi}'; }
echo "| Gbit/s, median of $rounds ($((bytes >> 20)) MiB each), min–max | gonetns | slirp4netns $(slirp4netns --version | head -1 | cut -d' ' -f3) | ratio |"
echo "| --- | ---: | ---: | ---: |"
for kind in $kinds; do
	case $kind in
	download) label="download: host → container through 10.0.2.2" ;;
	upload) label="upload: container → host through 10.0.2.2" ;;
	port-in-rootlessport) label="\`-p\` host → container (rootlessport)" ;;
	port-out-rootlessport) label="\`-p\` container → host (rootlessport)" ;;
	port-in-slirp4netns) label="\`-p\` host → container (port_handler=slirp4netns)" ;;
	port-out-slirp4netns) label="\`-p\` container → host (port_handler=slirp4netns)" ;;
	esac
	g=$(echo "${samples[gonetns,$kind]}" | median)
	s=$(echo "${samples[slirp4netns,$kind]}" | median)
	echo "| $label | **$g** ($(echo "${samples[gonetns,$kind]}" | range)) | $s ($(echo "${samples[slirp4netns,$kind]}" | range)) | $(awk "BEGIN{printf \"%.2fx\", $g/$s}") |"
done
