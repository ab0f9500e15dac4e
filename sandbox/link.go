package sandbox

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/veth"
)

// Link is the device behind the sandbox's interface, which the network
// reads and writes Ethernet frames through.
type Link string

const (
	// LinkAuto is the TAP when /dev/net/tun can be opened, else the
	// packet link.
	LinkAuto Link = "auto"
	// LinkTAP is a TAP device on /dev/net/tun.
	LinkTAP Link = "tap"
	// LinkPacket is a veth pair whose far end the network reads and writes
	// through AF_PACKET sockets (package veth): it needs no device node,
	// only what the sandbox's own root may do.
	LinkPacket Link = "packet"
)

// linkConfig is what opening the sandbox's interface needs.
type linkConfig struct {
	Kind    Link           `json:"kind"` // LinkAuto, LinkTAP or LinkPacket
	Iface   tap.LinkConfig `json:"iface"`
	VNetHdr bool           `json:"vnetHdr"` // for the TAP
	// OpenOnly opens the TAP (creating it, or attaching to one that
	// exists) and leaves its configuration to the namespace's owner:
	// RootlessKit 1.x creates and configures tap0 itself, and runs
	// slirp4netns without -c. The interface is the owner's, so there is
	// no packet link to fall back to.
	OpenOnly bool `json:"openOnly,omitempty"`
}

// linkInfo describes the device openLink opened, for the parent.
type linkInfo struct {
	Kind    Link   `json:"kind"` // LinkTAP or LinkPacket
	Name    string `json:"name"`
	VNetHdr bool   `json:"vnetHdr"`
	Offload bool   `json:"offload"`
	// TAPError is, when LinkAuto fell back to the packet link, why the TAP
	// could not be opened.
	TAPError string `json:"tapError,omitempty"`
	// RecvBuf and Sockets describe the packet link's receiving sockets.
	RecvBuf int `json:"recvBuf,omitempty"`
	Sockets int `json:"sockets,omitempty"`
}

// openLink creates the sandbox's interface in the calling thread's
// network namespace, with the addresses, routes and MTU of c, and returns
// the descriptors the network uses it through (newDevice makes a
// tap.Device of them). It is the one place the link is made, for
// gonetns's own child and for a namespace someone else made.
func openLink(c linkConfig) (linkInfo, []*os.File, error) {
	var tapErr error
	if c.OpenOnly {
		dev, err := tap.Open(tap.Options{Name: c.Iface.Name, VNetHdr: c.VNetHdr})
		if err != nil {
			return linkInfo{}, nil, err
		}
		return linkInfo{Kind: LinkTAP, Name: dev.Name, VNetHdr: dev.VNetHdr, Offload: dev.Offload}, []*os.File{dev.File}, nil
	}
	if c.Kind != LinkPacket {
		dev, err := tap.Open(tap.Options{Name: c.Iface.Name, VNetHdr: c.VNetHdr})
		if err == nil {
			if err := tap.Configure(c.Iface); err != nil {
				dev.File.Close()
				return linkInfo{}, nil, err
			}
			return linkInfo{Kind: LinkTAP, Name: dev.Name, VNetHdr: dev.VNetHdr, Offload: dev.Offload}, []*os.File{dev.File}, nil
		}
		if c.Kind == LinkTAP {
			return linkInfo{}, nil, err
		}
		tapErr = err
	}
	op, err := veth.Open(veth.Options{Name: c.Iface.Name, MTU: c.Iface.MTU})
	if err == nil {
		if err = tap.Configure(c.Iface); err != nil {
			op.Close()
		}
	}
	if err != nil {
		if tapErr != nil {
			return linkInfo{}, nil, fmt.Errorf("%w\nThe packet link, which needs no /dev/net/tun, failed too: %w", tapErr, err)
		}
		return linkInfo{}, nil, fmt.Errorf("packet link: %w", err)
	}
	li := linkInfo{Kind: LinkPacket, Name: c.Iface.Name, VNetHdr: true, Offload: true,
		RecvBuf: op.RecvBuf, Sockets: len(op.Files) - 1}
	if tapErr != nil {
		li.TAPError = tapReason(tapErr)
	}
	return li, op.Files, nil
}

// tapReason says in a few words why the TAP could not be opened.
func tapReason(err error) string {
	var errno syscall.Errno
	if !errors.Is(err, tap.ErrTunAccess) || !errors.As(err, &errno) {
		return fmt.Sprintf("the TAP cannot be made (%v)", err)
	}
	if st, serr := os.Stat("/dev/net/tun"); serr == nil && errors.Is(errno, syscall.EACCES) {
		return fmt.Sprintf("/dev/net/tun cannot be opened (%v, mode %04o)", errno, st.Mode().Perm())
	}
	return fmt.Sprintf("/dev/net/tun cannot be opened (%v)", errno)
}

// newDevice makes the parent's device of what openLink sent up.
func newDevice(li linkInfo, files []*os.File) (tap.Device, error) {
	if li.Kind == LinkPacket {
		return veth.NewDevice(files)
	}
	if len(files) != 1 {
		return nil, fmt.Errorf("the child sent %d files for the TAP device, want 1", len(files))
	}
	return tap.NewDevice(files[0], li.VNetHdr)
}
