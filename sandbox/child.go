package sandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"

	"github.com/gonetns/gonetns/implicit"
	"github.com/gonetns/gonetns/internal/fdbudget"
	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/portfwd"
	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/userns"
)

// netConfig is what the child's network hook receives.
type netConfig struct {
	Mode Net        `json:"mode"` // NetNone or NetBuiltin
	Link linkConfig `json:"link"`
	// DetachTo, when set, is where the child bind-mounts the network
	// namespace it creates for the sandbox (--detach-netns); the child
	// itself and the command stay in the namespace they were started in.
	DetachTo string `json:"detachTo,omitempty"`
	// WatchListeners makes the child report the namespace's listening
	// sockets to the parent (--port-driver=implicit), over the second of
	// Options.ExtraFiles.
	WatchListeners bool `json:"watchListeners,omitempty"`
}

// Init must be the first thing main does in every program that uses this
// package: gonetns runs the sandbox's child by re-executing the program
// (/proc/self/exe) with a marker in the environment, and in that process
// Init runs the child and exits with its status. In any other process Init
// returns at once. Nothing the program does before Init happens in the
// child: keep it first.
//
//	func main() {
//		sandbox.Init()
//		...
//	}
func Init(opts ...InitOption) {
	if !userns.IsChild() {
		return
	}
	fdbudget.Raise() // as the parent does (newNetwork); the command gets the original limit
	var ic initConfig
	for _, o := range opts {
		o(&ic)
	}
	os.Exit(userns.RunChild(childHooks(ic)))
}

// InitOption adjusts how Init runs the child.
type InitOption func(*initConfig)

type initConfig struct {
	newLogger func(debug bool) *slog.Logger
}

// ChildLogger makes the child log through the logger f returns (debug is
// Config.Debug); by default the child logs with slog's text handler on
// stderr.
func ChildLogger(f func(debug bool) *slog.Logger) InitOption {
	return func(c *initConfig) { c.newLogger = f }
}

// childState is what the network hook leaves for the serve hook, in the
// same child process: the thread in the detached network namespace, and
// the implicit port driver's watcher.
type childState struct {
	netns   *netnsThread      // nil unless the network namespace is detached
	watcher *implicit.Watcher // nil unless --port-driver=implicit
	subnets []netip.Prefix    // the sandbox network's own (tap0's)
}

// childHooks wire the child's side: the TAP and the namespace's addresses,
// and the published ports' dialer.
func childHooks(ic initConfig) userns.ChildHooks {
	st := &childState{}
	return userns.ChildHooks{
		NewLogger: ic.newLogger,
		Network: func(raw json.RawMessage, log *slog.Logger) (any, []*os.File, error) {
			var c netConfig
			if err := json.Unmarshal(raw, &c); err != nil {
				return nil, nil, fmt.Errorf("network config: %w", err)
			}
			inNS := func(fn func() error) error { return fn() }
			for _, p := range []netip.Prefix{c.Link.Iface.Address, c.Link.Iface.Address6} {
				if p.IsValid() {
					st.subnets = append(st.subnets, p.Masked())
				}
			}
			if c.DetachTo != "" {
				t, err := newNetNSThread(c.DetachTo)
				if err != nil {
					return nil, nil, err
				}
				st.netns = t
				inNS = t.Do
				log.Debug("detached network namespace", "path", c.DetachTo)
			}
			var info any
			var files []*os.File
			err := inNS(func() error {
				var err error
				info, files, err = setUpNetwork(c, log)
				return err
			})
			if err == nil && c.WatchListeners {
				// Here, before the command starts: its /proc (with
				// --pidns) would hide this process's.
				st.watcher, err = implicit.NewWatcher(implicit.WatchConfig{InNetNS: inNS, Logger: log})
				if err != nil {
					wire.CloseFiles(files)
				}
			}
			return info, files, err
		},
		// With the namespace detached, the command has started in the
		// host's; the child's main thread, whose namespaces are what
		// /proc/PID/ns shows, moves into the sandbox's, as RootlessKit's
		// child does: nsenter -U -m -n -t $(cat $STATE/child_pid), the
		// way in of containerd-rootless-setuptool.sh nsenter, lands
		// there (it failed with EPERM: the host's network namespace is
		// not the user namespace's to enter).
		Started: func(log *slog.Logger) {
			if st.netns == nil {
				return
			}
			if err := st.netns.enter(); err != nil {
				log.Warn("the child could not enter the detached network namespace: nsenter -n -t $(cat child_pid) will not reach it; use nsenter -n$ROOTLESSKIT_STATE_DIR/netns", "err", err)
			}
		},
		Serve: func(ctx context.Context, extra []*os.File, log *slog.Logger) {
			serveChild(ctx, extra, st, log)
		},
	}
}

// setUpNetwork runs in the sandbox's network namespace: lo up, and for
// NetBuiltin the sandbox's interface with its address, routes and MTU
// (openLink: the same for gonetns's own child and for the helper in a
// namespace someone else made, Join).
func setUpNetwork(c netConfig, log *slog.Logger) (any, []*os.File, error) {
	switch c.Mode {
	case NetNone:
		return nil, nil, tap.LoopbackUp()
	case NetBuiltin:
		li, files, err := openLink(c.Link)
		if err != nil {
			return nil, nil, err
		}
		log.Debug("link ready", "kind", li.Kind, "name", li.Name, "vnet_hdr", li.VNetHdr, "offload", li.Offload)
		return li, files, nil
	}
	return nil, nil, fmt.Errorf("unknown network mode %q", c.Mode)
}

// serveChild runs in the child while the command runs: it answers the
// parent's requests for connections inside the namespace (published
// ports) and, with --port-driver=implicit, reports the namespace's
// listeners.
func serveChild(ctx context.Context, extra []*os.File, st *childState, log *slog.Logger) {
	if st.watcher != nil && len(extra) == 2 {
		w := st.watcher
		st.watcher = nil
		c, err := wire.FileConn(extra[1])
		extra[1].Close()
		extra = extra[:1]
		if err != nil {
			log.Error("implicit ports unavailable", "err", err)
			w.Close()
		} else {
			done := make(chan struct{})
			go func() {
				defer close(done)
				if err := w.Run(ctx, c); err != nil {
					log.Error("implicit ports: the listener watcher stopped; ports stay as they are", "err", err)
				}
			}()
			defer func() { <-done }()
		}
	}
	if len(extra) == 0 {
		<-ctx.Done()
		return
	}
	c, err := wire.FileConn(extra[0])
	extra[0].Close()
	if err != nil {
		log.Error("published ports unavailable", "err", err)
		<-ctx.Done()
		return
	}
	cfg := portfwd.ChildConfig{Logger: log, SandboxPrefixes: st.subnets}
	if st.netns != nil {
		cfg.InNetNS = st.netns.Do
	}
	if err := portfwd.ServeChild(ctx, c, cfg); err != nil {
		log.Debug("port dialer ended", "err", err)
	}
}
