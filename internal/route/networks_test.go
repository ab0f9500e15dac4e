package route

import (
	"net/netip"
	"os/exec"
	"runtime"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// Networks finds the addresses and routes of a namespace it runs in: a
// new network namespace (this test needs root) with a veth pair, an
// address on it and a route through it.
func TestNetworks(t *testing.T) {
	if unix.Geteuid() != 0 {
		t.Fatal("this test makes a network namespace and needs root (run the unit tests as root, as make test does)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("ip (iproute2) is not installed")
	}
	done := make(chan struct{})
	var got []Network
	var err error
	go func() {
		defer close(done)
		// This thread goes into a namespace of its own and never comes
		// back: it ends with the goroutine.
		runtime.LockOSThread()
		if err = unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return
		}
		self := "/proc/" + strconv.Itoa(unix.Getpid()) + "/task/" + strconv.Itoa(unix.Gettid()) + "/ns/net"
		for _, args := range [][]string{
			{"link", "set", "lo", "up"},
			{"link", "add", "gn-test0", "type", "veth", "peer", "name", "gn-test1"},
			{"link", "set", "gn-test1", "up"},
			{"addr", "add", "192.0.2.7/24", "dev", "gn-test0"},
			{"link", "set", "gn-test0", "up"},
			{"route", "add", "198.51.100.0/24", "dev", "gn-test0"},
			{"route", "add", "default", "dev", "gn-test0"},
		} {
			cmd := exec.Command("nsenter", append([]string{"--net=" + self, "ip"}, args...)...)
			if out, e := cmd.CombinedOutput(); e != nil {
				t.Errorf("ip %v: %v\n%s", args, e, out)
				return
			}
		}
		got, err = Networks()
	}()
	<-done
	if err != nil {
		t.Fatal(err)
	}
	want := []Network{
		{Prefix: netip.MustParsePrefix("192.0.2.0/24"), Interface: "gn-test0", Address: netip.MustParseAddr("192.0.2.7")},
		{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Interface: "gn-test0"},
	}
	if len(got) != len(want) {
		t.Fatalf("Networks() = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("network %d: %v, want %v", i, got[i], want[i])
		}
	}
}
