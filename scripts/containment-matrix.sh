#!/bin/bash
# containment-matrix.sh LAUNCHER [FLAGS...]: run as an unprivileged user, it counts
# what a command's escapees leave running after each way a sandbox can end.
#
# The command starts four processes that try to get away (a background job, one in
# a new session, one that ignores TERM and HUP, one in a process group of its own),
# then: exits (exit), kills its parent, the launcher's child, from inside
# (child-inside), or the launcher's child is killed from outside (child-outside),
# or the launcher is (parent-outside), or both launcher processes are killed from
# inside at once (both-inside). With --pidns the inside scenarios are skipped
# (nothing inside can name the launcher's processes).
#
#   scripts/containment-matrix.sh gonetns --net=none
#   scripts/containment-matrix.sh rootlesskit --pidns
set -u
L=$1; shift
out=$(mktemp)
trap 'rm -f "$out"' EXIT
base=$((40000 + RANDOM % 20000))
inner='sleep $M1 >/dev/null 2>&1 & setsid sleep $M2 >/dev/null 2>&1 & (trap "" TERM HUP; exec sleep $M3) >/dev/null 2>&1 & perl -e "setpgrp(0,0); exec q(sleep), q($M4)" >/dev/null 2>&1 & '
scenarios="exit child-inside child-outside parent-outside both-inside"
case " $* " in *" --pidns "*) scenarios="exit child-outside parent-outside";; esac
for sc in $scenarios; do
	b=$((base++ * 10)); export M1=$((b+1)) M2=$((b+2)) M3=$((b+3)) M4=$((b+4))
	case $sc in
	exit) tail='sleep 0.5; exit 0';;
	child-inside) tail='sleep 0.5; kill -9 $PPID; sleep 3';;
	both-inside) tail='sleep 0.5; kill -9 $(awk "/^PPid/{print \$2}" /proc/$PPID/status) $PPID; sleep 3';;
	*) tail='echo ready; sleep 30';;
	esac
	: >"$out"
	setsid "$L" "$@" sh -c "$inner $tail" </dev/null >"$out" 2>&1 &
	lp=$!
	case $sc in
	child-outside|parent-outside)
		for _ in $(seq 50); do grep -q ready "$out" && break; sleep 0.1; done
		sleep 0.3
		if [ "$sc" = parent-outside ]; then kill -9 "$lp"; else kill -9 "$(pgrep -P "$lp" | head -1)"; fi;;
	esac
	wait "$lp" 2>/dev/null; st=$?
	sleep 2
	n=$(pgrep -f "^sleep $((b/10))" | wc -l)
	echo "$sc: exit status $st, processes left $n of 4"
	pkill -9 -f "^sleep $((b/10))"
done
