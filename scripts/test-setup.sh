#!/usr/bin/env bash
# Prepares this machine for gonetns's tests. Idempotent; needs root.
#
# Installed, and left installed:
#  - Debian packages the tests and benchmarks use (uidmap, iperf3, curl, ping,
#    getent's resolver, rootlesskit/rootlessctl, slirp4netns, pasta, tcpdump
#    to read --pcap captures)
#  - an unprivileged user with subordinate ids (gonetns-test) and one without
#    (gonetns-nosub), for the fallback single mapping
#  - for the drop-in tests (cmd/gonetns/{docker,scripts,rootlessctl}_e2e_test.go):
#    Debian's docker.io 20.10 (dockerd-rootless.sh, dockerd, docker-proxy),
#    containerd, runc, iptables, busybox-static (the offline test image),
#    nsenter; for the slirp4netns personality's tests
#    (cmd/gonetns/{podman,slirp4netns}_e2e_test.go): Debian's podman 4.3.1
#    with conmon, runc and catatonit (vfs storage: no fuse-overlayfs needed);
#    RootlessKit v3.0.1 built with go install into
#    /usr/local/libexec/gonetns-test, the reference the tests compare
#    gonetns with
#  - the kernel modules rootless Docker needs (tun, veth, bridge, nf_tables)
#
# Changed for the tests' run, and put back by scripts/test-teardown.sh (make
# test runs it on the way out, pass or fail), from what the first setup
# saved in $GONETNS_TEST_STATE (default /run/gonetns-test/saved):
#  - the system's rootful Docker and containerd stopped (not disabled; the
#    tests start rootless ones of their own), started again if they ran
#  - /dev/net/tun readable and writable by everyone (the common distro
#    default), its mode put back
#  - net.ipv4.ping_group_range widened to include gonetns-test's group (the
#    groups already allowed stay allowed), put back
#  - the kernel settings unprivileged user namespaces need, put back
set -euo pipefail

state=${GONETNS_TEST_STATE:-/run/gonetns-test/saved}

# save KEY VALUE records what setup is about to change, once: a second
# setup before the teardown keeps the first value, the machine's own.
save() {
	mkdir -p "$(dirname "$state")"
	touch "$state"
	grep -q "^$1=" "$state" || printf '%s=%s\n' "$1" "$2" >>"$state"
}

# set_sysctl NAME VALUE sets a sysctl, saving its value first.
set_sysctl() {
	local file="/proc/sys/$(echo "$1" | tr . /)"
	[ -e "$file" ] || return 0
	save "sysctl:$1" "$(cat "$file")"
	sysctl -q -w "$1=$2"
}

if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then
		exec sudo -n "$0" "$@"
	fi
	echo "test-setup: must run as root (it installs packages and creates test users)" >&2
	exit 1
fi

packages=(uidmap iperf3 curl iputils-ping iproute2 rootlesskit slirp4netns passt procps util-linux strace python3 tcpdump
	docker.io containerd runc iptables busybox-static podman conmon catatonit)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "test-setup: installing ${missing[*]}"
	# Packages must not start their daemons (docker.io and containerd
	# would): policy-rc.d answers "not allowed" for the install.
	policy_rc=""
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 0755 /usr/sbin/policy-rc.d
		policy_rc=/usr/sbin/policy-rc.d
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	[ -z "$policy_rc" ] || rm -f "$policy_rc"
fi

# The tests run Docker rootless, as the test user, started by themselves; a
# rootful daemon (its docker0 bridge, its iptables rules, its sockets) must
# not run beside them. Stopped, not disabled: the teardown starts again
# what ran.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
	for unit in docker.socket docker.service containerd.service; do
		if systemctl list-unit-files "$unit" >/dev/null 2>&1; then
			if systemctl is-active --quiet "$unit"; then
				save "systemd:$unit" active
			else
				save "systemd:$unit" inactive
			fi
			systemctl stop "$unit" >/dev/null 2>&1 || true
		fi
	done
elif command -v service >/dev/null 2>&1; then
	for svc in docker containerd; do
		if service "$svc" status >/dev/null 2>&1; then
			save "service:$svc" running
			service "$svc" stop >/dev/null 2>&1 || true
		else
			save "service:$svc" stopped
		fi
	done
fi
if pgrep -u 0 -x dockerd >/dev/null || pgrep -u 0 -x containerd >/dev/null; then
	# Not fatal: the tests talk to their own daemons' sockets only.
	echo "test-setup: warning: a rootful dockerd or containerd is still running (not started by systemd?); the tests start rootless ones of their own" >&2
fi

# RootlessKit v3.0.1, the reference of the drop-in tests (Debian has 1.1).
rk3=/usr/local/libexec/gonetns-test/rootlesskit-v3.0.1
if ! "$rk3/rootlesskit" --version 2>/dev/null | grep -q '3\.0\.1' || [ ! -x "$rk3/rootlessctl" ]; then
	gobin=$(command -v go || echo /usr/local/go/bin/go)
	if [ ! -x "$gobin" ]; then
		echo "test-setup: Go is needed to build RootlessKit v3.0.1 (go install); put go on PATH" >&2
		exit 1
	fi
	echo "test-setup: installing RootlessKit v3.0.1 into $rk3"
	mkdir -p "$rk3"
	GOBIN=$rk3 CGO_ENABLED=0 GOFLAGS=-mod=mod "$gobin" install \
		github.com/rootless-containers/rootlesskit/v3/cmd/rootlesskit@v3.0.1 \
		github.com/rootless-containers/rootlesskit/v3/cmd/rootlessctl@v3.0.1
	chmod -R a+rX /usr/local/libexec/gonetns-test
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

# Kernel prerequisites. Unprivileged user namespaces: allowed by default on
# Debian 11+, but older Debian kernels and Ubuntu 23.10+ (AppArmor) have a
# switch. Inside them, rootless Docker needs tun, veth, bridge and nf_tables
# with NAT (iptables-nft): a process in a user namespace cannot load modules,
# so load them here (built-in kernels have nothing to load).
set_sysctl kernel.unprivileged_userns_clone 1
set_sysctl kernel.apparmor_restrict_unprivileged_userns 0
if [ "$(sysctl -n user.max_user_namespaces)" = 0 ]; then
	set_sysctl user.max_user_namespaces 15000
fi
if [ -d "/lib/modules/$(uname -r)" ]; then
	modprobe -a tun veth bridge br_netfilter nf_tables nft_chain_nat nft_compat nf_nat xt_MASQUERADE xt_addrtype xt_conntrack 2>/dev/null || true
fi
if [ -e /dev/net/tun ]; then
	save tun "$(stat -c %a /dev/net/tun)"
else
	save tun absent
	mkdir -p /dev/net && mknod /dev/net/tun c 10 200
fi
chmod 0666 /dev/net/tun

# Ping sockets for gonetns-test's group, the groups allowed already staying
# allowed: the range grows to include it. (An empty range, lo > hi, is
# the kernel's default "1 0".)
gid=$(id -g gonetns-test)
read -r lo hi </proc/sys/net/ipv4/ping_group_range
if [ "$lo" -gt "$hi" ]; then
	lo=$gid hi=$gid
else
	[ "$gid" -ge "$lo" ] || lo=$gid
	[ "$gid" -le "$hi" ] || hi=$gid
fi
set_sysctl net.ipv4.ping_group_range "$lo $hi"

echo "test-setup: ok (users gonetns-test, gonetns-nosub; /dev/net/tun 0666; ping_group_range $lo $hi; RootlessKit v3.0.1 in $rk3; rootful docker and containerd stopped; scripts/test-teardown.sh puts back what $state records)"
