package e2etest

import (
	"os/exec"
	"strings"
	"sync"
	"testing"
)

// packetLinkTests are the names of the tests (with their subtests) whose
// Runners run gonetns without access to /dev/net/tun.
var packetLinkTests sync.Map

// WithoutTun makes the Runners that t and its subtests get run gonetns
// where /dev/net/tun cannot be opened, so that its default --link=auto
// takes the packet link: in a mount namespace of the run's own, the test
// user's /dev/net/tun is a node of mode 0600 (as many distributions ship
// it) and root's is absent (as in a container without --device
// /dev/net/tun). The machine's node stays as it is, for whatever else runs
// at the same time. The wrapper execs through, so the process the test
// starts is gonetns itself (its pid, its signals, its exit status).
func WithoutTun(t *testing.T) {
	packetLinkTests.Store(t.Name(), true)
	t.Cleanup(func() { packetLinkTests.Delete(t.Name()) })
}

// withoutTun reports whether t is, or is under, a test given to
// WithoutTun.
func withoutTun(t testing.TB) bool {
	name := t.Name()
	for {
		if _, ok := packetLinkTests.Load(name); ok {
			return true
		}
		i := strings.LastIndexByte(name, '/')
		if i < 0 {
			return false
		}
		name = name[:i]
	}
}

// hideTunScript runs in a new mount namespace as root: it replaces
// /dev/net by a tmpfs holding, for a user other than root, a tun node of
// mode 0600 (root could open that one, so it gets none), then becomes the
// user (setpriv, util-linux) and execs the command. Arguments: uid, gid,
// then the command.
const hideTunScript = `set -e
mount -t tmpfs -o mode=0755,size=16k gonetns-e2e-no-tun /dev/net
uid=$1 gid=$2
shift 2
if [ "$uid" = 0 ]; then
	exec "$@"
fi
mknod -m 0600 /dev/net/tun c 10 200
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups "$@"`

// hideTun rewrites cmd, made by Command for r, to run under hideTunScript.
func (r Runner) hideTun(cmd *exec.Cmd) {
	args := append([]string{"unshare", "--mount", "--propagation=private", "sh", "-c", hideTunScript, "sh", r.User.Uid, r.User.Gid, cmd.Path}, cmd.Args[1:]...)
	cmd.Path = "/usr/bin/unshare"
	cmd.Args = args
	cmd.SysProcAttr = nil // root until setpriv: mount needs it
}
