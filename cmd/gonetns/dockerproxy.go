package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd"
	"github.com/gonetns/gonetns/userns"
)

// runDockerProxy is gonetns invoked as rootlesskit-docker-proxy: the
// userland proxy Docker 20.10 to 27 run for each published port of a
// container when the daemon runs in RootlessKit (dockerd-rootless.sh).
// Docker runs it inside the sandbox's namespaces with docker-proxy's flags
// and a pipe on descriptor 3, on which it expects "0\n" once the port
// works, or "1\n" and the error.
//
// It publishes the port on the host through the REST API (host IP and
// port to the same port on the namespace's loopback) and itself relays
// from there to the container, with the same splice relay as every
// published port; on SIGINT or SIGTERM it removes the port again. So
// neither RootlessKit's proxy nor Docker's docker-proxy binary is needed.
// With port driver none or implicit, it only relays from the host IP and
// port inside (implicit then publishes that on the host by itself).
func runDockerProxy(args []string) int {
	signalParent := os.NewFile(3, "signal-parent")
	log := newLogger(os.Stderr, os.Getenv("GONETNS_DEBUG") != "", "rootlesskit-docker-proxy: ")
	// Caught before the port is published, so that Docker's SIGINT, even
	// right after "0", unpublishes it.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	stop, err := startDockerProxy(args, log)
	if err != nil {
		if signalParent != nil {
			fmt.Fprintf(signalParent, "1\n%s", err)
			signalParent.Close()
		}
		log.Error(err.Error())
		return 1
	}
	if signalParent != nil {
		fmt.Fprint(signalParent, "0\n")
		signalParent.Close()
	}
	<-sigs
	if err := stop(); err != nil {
		log.Warn(err.Error())
	}
	return 0
}

// dockerProxyArgs are docker-proxy's flags.
type dockerProxyArgs struct {
	proto         string
	hostIP        netip.Addr
	hostPort      int
	containerIP   netip.Addr
	containerPort int
}

func parseDockerProxyArgs(args []string) (dockerProxyArgs, error) {
	fs := flag.NewFlagSet("rootlesskit-docker-proxy", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	containerIP := fs.String("container-ip", "", "container ip")
	containerPort := fs.Int("container-port", -1, "container port")
	hostIP := fs.String("host-ip", "", "host ip")
	hostPort := fs.Int("host-port", -1, "host port")
	proto := fs.String("proto", "tcp", "proxy protocol")
	var a dockerProxyArgs
	if err := fs.Parse(args); err != nil {
		return a, fmt.Errorf("bad arguments: %w", err)
	}
	if *proto != "tcp" && *proto != "udp" {
		return a, fmt.Errorf("unsupported -proto %q: tcp or udp (sctp is not supported)", *proto)
	}
	a.proto, a.hostPort, a.containerPort = *proto, *hostPort, *containerPort
	var err error
	if a.hostIP, err = netip.ParseAddr(*hostIP); err != nil {
		return a, fmt.Errorf("bad -host-ip %q: %w", *hostIP, err)
	}
	if a.containerIP, err = netip.ParseAddr(*containerIP); err != nil {
		return a, fmt.Errorf("bad -container-ip %q: %w", *containerIP, err)
	}
	a.hostIP, a.containerIP = a.hostIP.Unmap(), a.containerIP.Unmap()
	if a.hostPort < 1 || a.hostPort > 65535 || a.containerPort < 1 || a.containerPort > 65535 {
		return a, fmt.Errorf("bad -host-port %d or -container-port %d", a.hostPort, a.containerPort)
	}
	return a, nil
}

// startDockerProxy publishes and relays; stop undoes it.
func startDockerProxy(args []string, log *slog.Logger) (stop func() error, err error) {
	a, err := parseDockerProxyArgs(args)
	if err != nil {
		return nil, err
	}
	stateDir := os.Getenv("ROOTLESSKIT_STATE_DIR")
	if stateDir == "" {
		return nil, errors.New("$ROOTLESSKIT_STATE_DIR is not set: rootlesskit-docker-proxy runs inside rootlesskit (dockerd-rootless.sh)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := api.NewClient(filepath.Join(stateDir, userns.APISocket))
	info, err := client.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("ask RootlessKit's API for its port driver: %w", err)
	}

	// The relay inside: from where the published port leads to the
	// container. This process runs in the namespace, so it dials
	// directly.
	// Docker runs one proxy process per port and address family, each
	// with a pool of its own: a few pipes and none kept idle, since the
	// kernel counts every pipe of the user against one budget
	// (fs.pipe-user-pages-soft) and shrinks them all beyond it.
	local := portfwd.NewManager(portfwd.Config{Dialer: directDialer{}, Logger: log, SplicePipes: dockerProxyPipes, SpliceIdlePipes: -1})
	innerIP := a.hostIP
	viaAPI := info.PortDriver != nil && info.PortDriver.Driver != "none" && info.PortDriver.Driver != "implicit"
	apiProto := a.proto + "4"
	if a.hostIP.Is6() {
		apiProto = a.proto + "6"
	}
	if viaAPI {
		if !slices.Contains(info.PortDriver.Protos, apiProto) {
			local.Close()
			return nil, fmt.Errorf("the port driver %q cannot publish %s", info.PortDriver.Driver, apiProto)
		}
		innerIP = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		if a.hostIP.Is6() {
			innerIP = netip.IPv6Loopback()
		}
		if info.PortDriver.DisallowLoopbackChildIP && info.NetworkDriver != nil && info.NetworkDriver.ChildIP.IsValid() {
			innerIP = info.NetworkDriver.ChildIP
		}
	}
	// One family, the inner IP's: Docker starts a proxy for 0.0.0.0 and
	// another for :: (with an IPv4 container too); a bare tcp on an
	// unspecified address would take both and the second would fail.
	innerProto := a.proto + "4"
	if innerIP.Is6() {
		innerProto = a.proto + "6"
	}
	inner := port.Spec{Proto: innerProto, ParentIP: innerIP, ParentPort: a.hostPort, ChildIP: a.containerIP, ChildPort: a.containerPort}
	if _, err := local.AddPort(ctx, inner); err != nil {
		local.Close()
		return nil, err
	}
	if !viaAPI {
		return local.Close, nil
	}
	st, err := client.AddPort(ctx, port.Spec{Proto: apiProto, ParentIP: a.hostIP, ParentPort: a.hostPort, ChildIP: innerIP, ChildPort: a.hostPort})
	if err != nil {
		local.Close()
		return nil, fmt.Errorf("publish %s %s:%d: %w", a.proto, a.hostIP, a.hostPort, err)
	}
	log.Debug("published", "id", st.ID, "spec", st.Spec.String(), "container", netip.AddrPortFrom(a.containerIP, uint16(a.containerPort)))
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := client.RemovePort(ctx, st.ID)
		var apiErr *api.APIError
		if err != nil && errors.As(err, &apiErr) {
			err = fmt.Errorf("unpublish port %d: %w", st.ID, err)
		} else {
			err = nil // gonetns is gone (the API does not answer): so is the port
		}
		return errors.Join(err, local.Close())
	}, nil
}

// dockerProxyPipes bounds the splice pipes of one proxy process: two
// serve one connection moving data both ways at once; more connections
// copy through a buffer meanwhile.
const dockerProxyPipes = 2

// directDialer dials in this process's own network namespace.
type directDialer struct{}

func (directDialer) Dial(ctx context.Context, proto string, addr, _ netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, proto, addr.String())
}
