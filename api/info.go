// Package api serves RootlessKit's REST API (v1.1.1) on a unix socket and
// is its client: GET /v1/info, GET/POST /v1/ports and DELETE
// /v1/ports/{id}, with RootlessKit's JSON shapes, so that rootlessctl,
// Docker's rootlesskit client, nerdctl and BuildKit drive gonetns
// unchanged. It serves any port driver through the port.Manager interface
// and knows nothing of how ports are published.
package api

import (
	"net/netip"

	"github.com/gonetns/gonetns/port"
)

// Version is the RootlessKit REST API version served (not gonetns's
// version).
const Version = "1.1.1"

// Info is the body of GET /v1/info, RootlessKit's api.Info.
type Info struct {
	APIVersion    string             `json:"apiVersion"` // REST API version; empty means Version
	Version       string             `json:"version"`    // gonetns's version
	StateDir      string             `json:"stateDir"`
	ChildPID      int                `json:"childPID"`
	NetworkDriver *NetworkDriverInfo `json:"networkDriver,omitempty"`
	PortDriver    *PortDriverInfo    `json:"portDriver,omitempty"`
	// Limits are gonetns's caps on what clients can hold open, each with
	// what is in use and what it did when reached, so that a user can see
	// that one was (gonetns's own field; RootlessKit clients ignore it).
	Limits []LimitInfo `json:"limits,omitempty"`
	// Confinement is gonetns's own: what the network process applied to
	// itself after set-up; absent when it was turned off.
	Confinement *ConfinementInfo `json:"confinement,omitempty"`
}

// LimitInfo is one of gonetns's caps (docs/limits.md has the rules).
type LimitInfo struct {
	// Name says what is capped: "api.connections",
	// "ports.tcp.connections", "ports.udp.flows", or the sandbox's own
	// "nat.tcp.connections", "nat.tcp.handshakes", "nat.udp.flows",
	// "nat.ping.sessions".
	Name string `json:"name"`
	// Max is the cap; InUse what is held now; Peak the most held at once,
	// where it is kept.
	Max   int `json:"max"`
	InUse int `json:"inUse"`
	Peak  int `json:"peak,omitempty"`
	// Clients is how many client addresses hold a share of it, where
	// the cap is shared by client.
	Clients int `json:"clients,omitempty"`
	// IdleTimeout ends what has moved nothing for this long ("1h0m0s"),
	// where it applies.
	IdleTimeout string `json:"idleTimeout,omitempty"`
	// Events counts what the limit did since start, by kind: "closed",
	// "waited" (api.connections), "reset", "preempted", "endedIdle"
	// (ports.tcp.connections), "evicted", "endedIdle" (ports.udp.flows,
	// nat.udp.flows, nat.ping.sessions), "reset" (nat.tcp.connections),
	// "evicted", "deferred" (nat.tcp.handshakes).
	Events map[string]uint64 `json:"events,omitempty"`
}

// ConfinementInfo says, layer by layer, how the network process confined
// itself: "ABI 7 applied", "filter applied (...)", "not available: ...".
type ConfinementInfo struct {
	Landlock string `json:"landlock"`
	Seccomp  string `json:"seccomp"`
}

// NetworkDriverInfo is RootlessKit's api.NetworkDriverInfo. Fields after
// DynamicChildIP are gonetns's own; RootlessKit clients ignore them.
type NetworkDriverInfo struct {
	Driver         string       `json:"driver"`
	DNS            []netip.Addr `json:"dns,omitempty"`
	ChildIP        netip.Addr   `json:"childIP,omitzero"`
	DynamicChildIP bool         `json:"dynamicChildIP,omitempty"`
	// Link is the device behind the sandbox's interface: "tap" or
	// "packet" (a veth pair read through AF_PACKET sockets).
	Link string `json:"link,omitempty"`
	// Egress is the egress policy of gonetns's builtin network.
	Egress *EgressInfo `json:"egress,omitempty"`
}

// EgressInfo is the egress policy (--allow, --deny, --deny-metadata,
// --deny-private) over the host addresses the sandbox's traffic goes to.
type EgressInfo struct {
	// Default is "allow" or "deny": the verdict for addresses no rule
	// covers ("deny" as soon as one rule allows).
	Default string `json:"default"`
	// Rules, most specific first; the first whose prefix contains an
	// address decides.
	Rules []EgressRule `json:"rules"`
}

// EgressRule is one rule of the egress policy.
type EgressRule struct {
	Prefix netip.Prefix `json:"prefix"`
	Action string       `json:"action"`           // "allow" or "deny"
	Origin string       `json:"origin,omitempty"` // the flag it came from
}

// PortDriverInfo is RootlessKit's api.PortDriverInfo. Fields after
// DisallowLoopbackChildIP are gonetns's own; RootlessKit clients ignore
// them.
type PortDriverInfo struct {
	Driver                  string   `json:"driver"`
	Protos                  []string `json:"protos"`
	DisallowLoopbackChildIP bool     `json:"disallowLoopbackChildIP,omitempty"`
	// SourceIPTransparent reports whether connections through published
	// ports keep the client's address inside (--source-ip-transparent).
	SourceIPTransparent *bool `json:"sourceIPTransparent,omitempty"`
	// Unpublished lists what the implicit driver saw listening inside and
	// does not publish, and why (a port the host was using is left to
	// the host).
	Unpublished []UnpublishedPort `json:"unpublished,omitempty"`
}

// UnpublishedPort is a port listening inside that the implicit driver
// does not publish.
type UnpublishedPort struct {
	Spec   port.Spec `json:"spec"`
	Reason string    `json:"reason"`
	// Retrying: the driver tries again; false for a port left to the host.
	Retrying bool `json:"retrying,omitempty"`
}

// RootlessKitFields returns i with only the fields RootlessKit's API has:
// what a RootlessKit client sees of it.
func (i Info) RootlessKitFields() Info {
	i.Limits = nil
	i.Confinement = nil
	if nd := i.NetworkDriver; nd != nil {
		c := *nd
		c.Egress = nil
		c.Link = ""
		i.NetworkDriver = &c
	}
	if pd := i.PortDriver; pd != nil {
		c := *pd
		c.SourceIPTransparent = nil
		c.Unpublished = nil
		i.PortDriver = &c
	}
	return i
}
