package fdbudget

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestFor(t *testing.T) {
	for _, tc := range []struct {
		limit int
		want  Budget
	}{
		// A tiny limit: everything small, nothing zero.
		{256, Budget{Limit: 256, Reserve: 64, SplicePipes: 3, SpliceIdlePipes: 1,
			PortTCPConns: 37, PortUDPFlows: 11, NATTCPConns: 55, NATUDPFlows: 20, EchoFlows: 5, APIConns: 11, ImplicitPorts: 1}},
		// A login's default soft limit, if the hard one is the same.
		{1024, Budget{Limit: 1024, Reserve: 256, SplicePipes: 12, SpliceIdlePipes: 3,
			PortTCPConns: 148, PortUDPFlows: 44, NATTCPConns: 223, NATUDPFlows: 81, EchoFlows: 22, APIConns: 44, ImplicitPorts: 7}},
		// A hard limit of 20000, so the runtime's soft 19999.
		{19999, Budget{Limit: 19999, Reserve: 832, SplicePipes: 32, SpliceIdlePipes: 8,
			PortTCPConns: 3820, PortUDPFlows: 1146, NATTCPConns: 5730, NATUDPFlows: 2101, EchoFlows: 573, APIConns: 1024, ImplicitPorts: 191}},
		// systemd's and Docker's usual hard limits: memory caps bind.
		{524287, Budget{Limit: 524287, Reserve: 832, SplicePipes: 32, SpliceIdlePipes: 8,
			PortTCPConns: 16384, PortUDPFlows: 16384, NATTCPConns: 16384, NATUDPFlows: 16384, EchoFlows: 1024, APIConns: 1024, ImplicitPorts: 4096}},
		{1048575, Budget{Limit: 1048575, Reserve: 832, SplicePipes: 32, SpliceIdlePipes: 8,
			PortTCPConns: 16384, PortUDPFlows: 16384, NATTCPConns: 16384, NATUDPFlows: 16384, EchoFlows: 1024, APIConns: 1024, ImplicitPorts: 4096}},
	} {
		got := For(tc.limit)
		if got != tc.want {
			t.Errorf("For(%d) =\n %+v\nwant\n %+v", tc.limit, got, tc.want)
		}
	}
}

// TestForLeavesTheReserve: for any limit, every cap reached at once still
// leaves the reserve, and no cap is zero.
func TestForLeavesTheReserve(t *testing.T) {
	for limit := 64; limit <= 1<<21; limit = limit*5/4 + 1 {
		b := For(limit)
		if b.Reserve+b.Used() > limit {
			t.Errorf("For(%d): reserve %d + caps %d exceed the limit", limit, b.Reserve, b.Used())
		}
		if limit >= 4*(reserveBase+reserveDNS+reserveListeners) && b.Reserve != reserveBase+reserveDNS+reserveListeners {
			t.Errorf("For(%d): reserve %d, want the full %d", limit, b.Reserve, reserveBase+reserveDNS+reserveListeners)
		}
		for name, v := range map[string]int{"PortTCPConns": b.PortTCPConns, "SplicePipes": b.SplicePipes, "SpliceIdlePipes": b.SpliceIdlePipes,
			"PortUDPFlows": b.PortUDPFlows, "NATTCPConns": b.NATTCPConns, "NATUDPFlows": b.NATUDPFlows, "EchoFlows": b.EchoFlows, "APIConns": b.APIConns, "ImplicitPorts": b.ImplicitPorts} {
			if v < 1 {
				t.Errorf("For(%d).%s = %d", limit, name, v)
			}
		}
		if b.SpliceIdlePipes > b.SplicePipes {
			t.Errorf("For(%d): %d idle pipes of %d", limit, b.SpliceIdlePipes, b.SplicePipes)
		}
	}
}

// TestRaise: the soft limit ends at least one below the hard one, and what
// Raise reports is what is in force.
func TestRaise(t *testing.T) {
	got, err := Raise()
	if err != nil {
		t.Fatal(err)
	}
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if uint64(got) != lim.Cur || lim.Cur+1 < lim.Max {
		t.Fatalf("Raise = %d; limit now soft %d, hard %d", got, lim.Cur, lim.Max)
	}
}
