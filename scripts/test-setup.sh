#!/usr/bin/env bash
# Prepares this machine for gonetns's tests. Idempotent; needs root.
#
#  - Debian packages the tests and benchmarks use (uidmap, iperf3, curl, ping,
#    getent's resolver, rootlesskit/rootlessctl, slirp4netns, pasta, tcpdump
#    to read --pcap captures)
#  - an unprivileged user with subordinate ids (gonetns-test) and one without
#    (gonetns-nosub), for the fallback single mapping
#  - /dev/net/tun readable and writable by everyone (the common distro default)
#  - ping sockets allowed for gonetns-test's group only, so that both the
#    forwarding path (unprivileged run) and the "no ping sockets" notice (root
#    run) are exercised
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then
		exec sudo -n "$0" "$@"
	fi
	echo "test-setup: must run as root (it installs packages and creates test users)" >&2
	exit 1
fi

packages=(uidmap iperf3 curl iputils-ping iproute2 rootlesskit slirp4netns passt procps util-linux strace python3 tcpdump)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "test-setup: installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

add_user() {
	id -u "$1" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$1"
}
add_user gonetns-test
add_user gonetns-nosub

set_subid() { # file user start count
	local file=$1 user=$2 line="$2:$3:$4"
	touch "$file"
	grep -q "^$user:" "$file" || echo "$line" >>"$file"
}
set_subid /etc/subuid gonetns-test 300000 65536
set_subid /etc/subgid gonetns-test 300000 65536
# gonetns-nosub must have no entry at all
sed -i '/^gonetns-nosub:/d' /etc/subuid /etc/subgid

chmod 0666 /dev/net/tun

gid=$(id -g gonetns-test)
sysctl -q -w "net.ipv4.ping_group_range=$gid $gid"

echo "test-setup: ok (users gonetns-test, gonetns-nosub; /dev/net/tun 0666; ping_group_range $gid $gid)"
