#!/usr/bin/env bash
# Puts back what scripts/test-setup.sh changed for the tests' run, from what
# it saved in $GONETNS_TEST_STATE (default /run/gonetns-test/saved): the
# rootful Docker and containerd started again if they ran, the sysctls
# (ping_group_range, the user-namespace switches) and /dev/net/tun's mode
# as they were. The packages, test users and RootlessKit v3 stay installed.
# Without a saved state (no setup since the last teardown) it does nothing.
# Needs root.
set -euo pipefail

state=${GONETNS_TEST_STATE:-/run/gonetns-test/saved}
[ -e "$state" ] || exit 0
if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then
		exec sudo -n "$0" "$@"
	fi
	echo "test-teardown: must run as root (it restores sysctls and services)" >&2
	exit 1
fi

status=0
restored=()
while IFS= read -r line; do
	key=${line%%=*} value=${line#*=}
	case $key in
	sysctl:*)
		name=${key#sysctl:}
		sysctl -q -w "$name=$value" || status=1
		restored+=("$name=$value")
		;;
	tun)
		if [ "$value" = absent ]; then
			rm -f /dev/net/tun || status=1
		else
			chmod "$value" /dev/net/tun || status=1
		fi
		restored+=("/dev/net/tun $value")
		;;
	systemd:*)
		if [ "$value" = active ]; then
			systemctl start "${key#systemd:}" || status=1
			restored+=("${key#systemd:} started")
		fi
		;;
	service:*)
		if [ "$value" = running ]; then
			service "${key#service:}" start || status=1
			restored+=("${key#service:} started")
		fi
		;;
	esac
done <"$state"
if [ "$status" -eq 0 ]; then
	rm -f "$state"
	rmdir "$(dirname "$state")" 2>/dev/null || true # the setup made it; empty now unless someone else uses it
	echo "test-teardown: put back ${restored[*]:-nothing}"
else
	echo "test-teardown: some settings could not be put back; $state is kept (run this script again as root)" >&2
fi
exit "$status"
