// Package fdbudget divides the process's open-files limit among the
// things that hold descriptors for the sandbox (published-port
// connections, NAT connections and flows, splice pipes, API connections),
// so that no one of them can take the descriptors the others need: with
// every cap reached at once, a reserve is still left for DNS, the API's
// listener, the published ports' listeners and the process itself.
//
// It is the one place of that arithmetic. The sandbox calls Raise and For
// at start and hands each number to the package that enforces it.
package fdbudget

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/flowtable"
)

// Budget is how many of each descriptor holder the process may have open
// at once. Every field is at least 1.
type Budget struct {
	// Limit is the soft RLIMIT_NOFILE the budget divides.
	Limit int
	// Reserve is kept for what is not capped here: the process itself
	// (stdio, TAP, epoll, runtime), DNS queries being forwarded, the API
	// and published ports' listeners.
	Reserve int
	// PortTCPConns bounds the relayed TCP connections of all published
	// ports together (two sockets each).
	PortTCPConns int
	// SplicePipes bounds the pipes the published ports' relays splice
	// through (two descriptors each), in use or idle; SpliceIdlePipes
	// the idle ones kept open for reuse.
	SplicePipes, SpliceIdlePipes int
	// PortUDPFlows bounds the UDP flows of all published ports together
	// (a socket each).
	PortUDPFlows int
	// NATTCPConns, NATUDPFlows and EchoFlows bound the sandbox's outgoing
	// TCP connections, UDP flows and ping sessions (a host socket each).
	NATTCPConns, NATUDPFlows, EchoFlows int
	// APIConns bounds the REST API's open connections.
	APIConns int
	// ImplicitPorts bounds the ports the implicit port driver publishes
	// by itself, following the sandbox's listeners (up to two host
	// listeners each: both address families). Ports published through
	// the API or -p are in the reserve.
	ImplicitPorts int
}

// Fixed parts of the reserve.
const (
	// reserveBase: stdio, the TAP, epoll and the runtime's own, the
	// state dir's lock, the dial protocol's socket, a profile, logs.
	reserveBase = 64
	// reserveDNS: the DNS forwarder has at most 256 queries in flight
	// (dns.maxInFlight), each with an upstream socket, and a UDP query
	// retried over TCP may hold a second one for a moment.
	reserveDNS = 2 * 256
	// reserveListeners: the published ports' host sockets (one each) and
	// the API's listener; Docker publishes a port or two per container.
	reserveListeners = 256
)

// Pipes. PipeSize in package relay is 1 MiB per pipe and the kernel's
// fs.pipe-user-pages-soft gives a user 64 MiB of pipes before it shrinks
// new ones (the sandbox's too) to one page: 32 pipes stay within half of
// that. A relay holds a pipe only while data moves, so 32 serve 32
// directions moving data at the same instant; a direction that finds none
// copies through a buffer instead. Measured with iperf3 through -p: one
// busy connection needs one pipe per direction.
const (
	maxPipes     = 32
	maxIdlePipes = 8
)

// Shares of what is left after the reserve and the pipes, in percent;
// they add up to 98 (2 % slack). Published ports get the most: with two
// sockets per connection, theirs are what runs the process out of
// descriptors first (4,000 idle clients did at a soft limit of 1,024).
// The API's share holds a burst of a thousand requests at once (its limit
// never closes a connection whose request has arrived, so the requests in
// flight must fit): 1,024 from a hard limit of 20000.
const (
	sharePortTCP  = 40
	shareNATTCP   = 30
	shareNATUDP   = 11
	sharePortUDP  = 6
	shareEcho     = 3
	shareAPI      = 6
	shareImplicit = 2
)

// Upper caps: beyond them memory (goroutines, buffers, netstack state),
// not descriptors, is what runs out. UDP flows, the NAT's and the
// published ports', are flowtable.MaxFlows, the tables' own cap; the
// NAT's TCP connections are its default (nat.DefaultMaxTCPConns);
// published-port connections were 4096 per port and are now one cap for
// all ports; the API's is api.DefaultMaxConns (a connection costs
// ~16 KiB: goroutine and buffers).
const (
	capPortTCP  = 16384
	capNATTCP   = 16384
	capNATUDP   = flowtable.MaxFlows
	capPortUDP  = flowtable.MaxFlows
	capEcho     = 1024
	capAPI      = 1024
	capImplicit = 4096 // implicit.DefaultMaxPorts
)

// For divides a limit of open files.
func For(limit int) Budget {
	b := Budget{Limit: limit}
	b.Reserve = min(reserveBase+reserveDNS+reserveListeners, max(limit/4, 16))
	free := max(limit-b.Reserve, 0)
	b.SplicePipes = clamp(free/64, 1, maxPipes) // at most 1/32 of the rest in pipes
	b.SpliceIdlePipes = clamp(b.SplicePipes/4, 1, maxIdlePipes)
	free = max(free-2*b.SplicePipes, 0)
	share := func(percent, fdsEach, upper int) int {
		return clamp(free*percent/100/fdsEach, 1, upper)
	}
	b.PortTCPConns = share(sharePortTCP, 2, capPortTCP)
	b.NATTCPConns = share(shareNATTCP, 1, capNATTCP)
	b.NATUDPFlows = share(shareNATUDP, 1, capNATUDP)
	b.PortUDPFlows = share(sharePortUDP, 1, capPortUDP)
	b.EchoFlows = share(shareEcho, 1, capEcho)
	b.APIConns = share(shareAPI, 1, capAPI)
	b.ImplicitPorts = share(shareImplicit, 2, capImplicit)
	return b
}

// Used is the most descriptors the capped holders can have open at once
// (the budget's worst case, without the reserve).
func (b Budget) Used() int {
	return 2*b.PortTCPConns + 2*b.SplicePipes + b.PortUDPFlows +
		b.NATTCPConns + b.NATUDPFlows + b.EchoFlows + b.APIConns + 2*b.ImplicitPorts
}

func (b Budget) String() string {
	return fmt.Sprintf("open-files limit %d: %d reserved; published ports %d TCP connections, %d UDP flows, %d splice pipes; NAT %d TCP connections, %d UDP flows, %d ping sessions; API %d connections; %d implicit ports",
		b.Limit, b.Reserve, b.PortTCPConns, b.PortUDPFlows, b.SplicePipes, b.NATTCPConns, b.NATUDPFlows, b.EchoFlows, b.APIConns, b.ImplicitPorts)
}

func clamp(v, lo, hi int) int { return min(max(v, lo), hi) }

// Raise raises the soft RLIMIT_NOFILE to the hard limit (less one, as
// below) and returns the soft limit in force.
//
// Go's runtime already does this at start, to one below the hard limit,
// and remembers the original soft limit so that the programs it starts
// (the sandbox's command) get the original back. Raise keeps that: it
// only acts if the soft limit is still lower (the runtime's attempt
// failed), with a direct prlimit(2) to the same value, because a call
// through syscall.Setrlimit or unix.Prlimit would tell the runtime to pass
// the raised limit on to the command. Call it in both the parent and the
// child, before anything opens many files.
func Raise() (int, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("read the open-files limit: %w", err)
	}
	if lim.Max > 1 && lim.Cur < lim.Max-1 {
		want := unix.Rlimit{Cur: lim.Max - 1, Max: lim.Max}
		if _, _, errno := unix.RawSyscall6(unix.SYS_PRLIMIT64, 0, unix.RLIMIT_NOFILE,
			uintptr(unsafe.Pointer(&want)), 0, 0, 0); errno != 0 {
			return int(lim.Cur), fmt.Errorf("raise the open-files limit from %d to %d: %w (caps are derived from %d; raise it with ulimit -n)",
				lim.Cur, want.Cur, errno, lim.Cur)
		}
		lim = want
	}
	return int(min(lim.Cur, 1<<30)), nil
}
