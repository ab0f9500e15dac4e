package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"
)

// Every server the harness runs listens on the host's 127.0.0.1 only.
var loopback = netip.MustParseAddr(targetHost)

// echoServers are a TCP and a UDP echo server on 127.0.0.1, for the hello,
// request/response, new-connection and UDP measurements.
type echoServers struct {
	tcp  *net.TCPListener
	udp  *net.UDPConn
	wg   sync.WaitGroup
	mu   sync.Mutex
	conn map[net.Conn]struct{}
}

func startEchoServers() (*echoServers, error) {
	l, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
	if err != nil {
		return nil, fmt.Errorf("echo server: %w", err)
	}
	u, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("UDP echo server: %w", err)
	}
	e := &echoServers{tcp: l, udp: u, conn: map[net.Conn]struct{}{}}
	e.wg.Add(2)
	go e.serveTCP()
	go e.serveUDP()
	return e, nil
}

func (e *echoServers) tcpPort() int { return e.tcp.Addr().(*net.TCPAddr).Port }
func (e *echoServers) udpPort() int { return e.udp.LocalAddr().(*net.UDPAddr).Port }

func (e *echoServers) serveTCP() {
	defer e.wg.Done()
	for {
		c, err := e.tcp.AcceptTCP()
		if err != nil {
			return
		}
		e.mu.Lock()
		if e.conn == nil { // closed
			e.mu.Unlock()
			c.Close()
			return
		}
		e.conn[c] = struct{}{}
		e.mu.Unlock()
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			echo(c)
			e.mu.Lock()
			delete(e.conn, c)
			e.mu.Unlock()
			c.Close()
		}()
	}
}

// echo copies what c sends back to it, with a small buffer and no splice
// (one byte at a time is the common case).
func echo(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (e *echoServers) serveUDP() {
	defer e.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := e.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		e.udp.WriteToUDPAddrPort(buf[:n], from)
	}
}

// Close stops both servers and waits for their goroutines.
func (e *echoServers) Close() {
	e.tcp.Close()
	e.udp.Close()
	e.mu.Lock()
	for c := range e.conn {
		c.Close()
	}
	e.conn = nil
	e.mu.Unlock()
	e.wg.Wait()
}

// freePort returns a TCP port of 127.0.0.1 that was free a moment ago.
// Another process may take it before we use it: callers retry.
func freePort() (int, error) {
	l, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// iperfServer is a one-off `iperf3 -s` on 127.0.0.1 (one test, then it
// exits).
type iperfServer struct {
	p    *proc
	port int
}

// startIperfServer starts iperf3 -s -1 on a free port of 127.0.0.1 and
// waits until it listens; it retries on a port someone else took.
func startIperfServer(ctx context.Context, iperf3 string) (*iperfServer, error) {
	var lastErr error
	for range 3 {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		p, err := startProc(ctx, procOptions{
			argv:   []string{iperf3, "-s", "-1", "-B", loopback.String(), "-p", strconv.Itoa(port)},
			stdout: io.Discard,
		})
		if err != nil {
			return nil, err
		}
		if err := waitListening(ctx, p, port, loopback); err != nil {
			p.kill()
			<-p.done
			lastErr = err
			continue
		}
		return &iperfServer{p: p, port: port}, nil
	}
	return nil, fmt.Errorf("iperf3 server on 127.0.0.1: %w", lastErr)
}

// waitListening waits until port listens on addr in the harness's
// network namespace, or p exits.
func waitListening(ctx context.Context, p *proc, port int, addr netip.Addr) error {
	deadline := time.Now().Add(10 * time.Second)
	for !listening(port, addr) {
		if p.exited() {
			return errors.New(p.errorText(fmt.Errorf("exited before listening on port %d: %v", port, p.err)))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on %v:%d after 10 s", addr, port)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// stop ends the server if the test did not.
func (s *iperfServer) stop() {
	s.p.kill()
	<-s.p.done
}
