package main

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// TestMain lets the test binary double as the helper programs the
// end-to-end tests run inside the sandbox (e2etest.Helper), and removes
// the gonetns binary the tests built when they are done.
func TestMain(m *testing.M) {
	if mode := os.Getenv(e2etest.HelperEnv); mode != "" {
		os.Exit(runHelper(mode, os.Args[1:]))
	}
	// What this process inherited beyond stdio stays here: the tests run
	// under flock(1), whose lock descriptor every child would otherwise
	// inherit, and a server a test leaves behind would hold the lock of
	// every other test run on the machine.
	unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	code := m.Run()
	e2etest.Cleanup()
	os.Exit(code)
}

func runHelper(mode string, args []string) int {
	fail := func(format string, a ...any) int {
		fmt.Printf("error: "+format+"\n", a...)
		return 1
	}
	switch mode {
	case "tcp-halfclose": // ADDR NBYTES: send, half-close, print the reply
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return fail("%v", err)
		}
		n, _ := strconv.Atoi(args[1])
		c.Write(make([]byte, n))
		c.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(c)
		if err != nil {
			return fail("%v", err)
		}
		fmt.Printf("%s\n", b)
	case "tcp-rr": // ADDR N: N round trips of one byte on one connection, and when (gonetns's log's clock)
		start := time.Now()
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return fail("%v", err)
		}
		defer c.Close()
		n, _ := strconv.Atoi(args[1])
		b := []byte{0}
		for i := range n {
			b[0] = byte(i)
			if _, err := c.Write(b); err != nil {
				return fail("round trip %d: %v", i, err)
			}
			if _, err := io.ReadFull(c, b); err != nil || b[0] != byte(i) {
				return fail("round trip %d: %v (got %d)", i, err, b[0])
			}
		}
		fmt.Printf("%d round trips from %s to %s\n", n, start.Format(logClock), time.Now().Format(logClock))
	case "tcp-dial": // ADDR [TIMEOUT]: report the outcome and how long it took
		timeout := 10 * time.Second
		if len(args) > 1 {
			if d, err := time.ParseDuration(args[1]); err == nil {
				timeout = d
			}
		}
		start := time.Now()
		c, err := net.DialTimeout("tcp", args[0], timeout)
		ms := time.Since(start).Milliseconds()
		if err != nil {
			fmt.Printf("error after %dms: %v\n", ms, err)
			return 1
		}
		c.Close()
		fmt.Printf("connected after %dms\n", ms)
	case "tcp-keepalive": // ADDR IDLE: probes from 1 s idle on, every second, 2 unanswered end it; idle IDLE, then a byte echoed
		d := net.Dialer{Timeout: 5 * time.Second,
			KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: time.Second, Interval: time.Second, Count: 2}}
		c, err := d.Dial("tcp", args[0])
		if err != nil {
			return fail("%v", err)
		}
		defer c.Close()
		idle, err := time.ParseDuration(args[1])
		if err != nil {
			return fail("%v", err)
		}
		time.Sleep(idle)
		b := []byte{'k'}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(b); err != nil {
			return fail("after %v idle: %v", idle, err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return fail("after %v idle: %v", idle, err)
		}
		fmt.Printf("alive after %v idle\n", idle)
	case "tcp-reply-reset": // ADDR N [WAIT]: N times, send a 5020-byte request, wait, read the answer to its end; count answers read before a reset
		n, _ := strconv.Atoi(args[1])
		var wait time.Duration
		if len(args) > 2 {
			wait, _ = time.ParseDuration(args[2])
		}
		got := 0
		for i := range n {
			c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
			if err != nil {
				return fail("%v", err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.Write(make([]byte, 5020))
			time.Sleep(wait)
			b, err := io.ReadAll(c)
			c.Close()
			fmt.Printf("connection %d: %d bytes, then %v\n", i+1, len(b), err)
			if len(b) > 0 && errors.Is(err, syscall.ECONNRESET) {
				got++
			}
		}
		fmt.Printf("the answer, then the reset: %d of %d\n", got, n)
	case "tcp-read-end": // ADDR N WAIT: N times, connect, wait, read to the end; count ends of stream and resets
		n, _ := strconv.Atoi(args[1])
		wait, _ := time.ParseDuration(args[2])
		eof, reset := 0, 0
		for range n {
			c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
			if err != nil {
				return fail("%v", err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			time.Sleep(wait)
			b, err := io.ReadAll(c)
			c.Close()
			switch {
			case err == nil && len(b) > 0:
				eof++
			case errors.Is(err, syscall.ECONNRESET) && len(b) > 0:
				reset++
			default:
				return fail("after %d bytes: %v", len(b), err)
			}
		}
		fmt.Printf("the answer, then the end of the stream: %d; then a reset: %d\n", eof, reset)
	case "tcp-sum": // ADDR: read to the end, print the count and sha256 of what came
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return fail("%v", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		h := sha256.New()
		n, err := io.Copy(h, c)
		if err != nil {
			return fail("after %d bytes: %v", n, err)
		}
		fmt.Printf("%d bytes, sha256 %x\n", n, h.Sum(nil))
	case "udp-refused": // ADDR: one datagram on a connected socket, then how the read ends
		c, err := net.Dial("udp", args[0])
		if err != nil {
			return fail("%v", err)
		}
		defer c.Close()
		c.Write([]byte("anyone?"))
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err = c.Read(make([]byte, 100))
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			fmt.Println("refused")
		case err != nil:
			fmt.Printf("read: %v\n", err)
		default:
			fmt.Println("an answer")
		}
	case "tcp-send-reset": // ADDR N: N connections, one at a time, each sends 100 bytes and closes with a reset
		n, _ := strconv.Atoi(args[1])
		for range n {
			c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
			if err != nil {
				return fail("%v", err)
			}
			c.Write(make([]byte, 100))
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
		fmt.Printf("%d connections reset\n", n)
	case "tcp-conc": // ADDR N: open N connections at once, 1 byte echoed on each, hold them until a line on stdin
		n, _ := strconv.Atoi(args[1])
		held, refused, failed := tcpConc(args[0], n)
		fmt.Printf("held %d refused %d failed %d\n", held, refused, failed)
		io.ReadAll(io.LimitReader(os.Stdin, 1)) // the test says when
		fmt.Println("closed")
	case "udp-gso-send": // ADDR N SEG: one send of N bytes that the kernel splits into datagrams of SEG (UDP_SEGMENT)
		c, err := net.Dial("udp", args[0])
		if err != nil {
			return fail("%v", err)
		}
		n, _ := strconv.Atoi(args[1])
		seg, _ := strconv.Atoi(args[2])
		rc, err := c.(*net.UDPConn).SyscallConn()
		if err != nil {
			return fail("%v", err)
		}
		var serr error
		rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_SEGMENT, seg) })
		if serr != nil {
			return fail("UDP_SEGMENT: %v", serr)
		}
		if _, err := c.Write(make([]byte, n)); err != nil {
			return fail("%v", err)
		}
	case "udp-echo": // ADDR MSG: one datagram, print the reply
		c, err := net.Dial("udp", args[0])
		if err != nil {
			return fail("%v", err)
		}
		c.Write([]byte(args[1]))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 65536)
		n, err := c.Read(b)
		if err != nil {
			return fail("%v", err)
		}
		fmt.Printf("%s\n", b[:n])
	case "udp-burst": // N ADDR...: one datagram from each of N new source ports, spread over the ADDRs; count the answers
		n, _ := strconv.Atoi(args[0])
		addrs := args[1:]
		// One round trip first: until the kernel has resolved the
		// gateway's link address it queues what is sent (a few hundred
		// datagrams) and drops the oldest beyond that.
		warm, err := net.Dial("udp", addrs[0])
		if err != nil {
			return fail("%v", err)
		}
		warm.Write([]byte("warm"))
		warm.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := warm.Read(make([]byte, 64)); err != nil {
			return fail("warm-up: %v", err)
		}
		warm.Close()
		conns := make([]net.Conn, 0, n)
		for i := range n {
			c, err := net.Dial("udp", addrs[i%len(addrs)])
			if err != nil {
				return fail("socket %d: %v", i, err)
			}
			defer c.Close()
			conns = append(conns, c)
		}
		for i, c := range conns {
			fmt.Fprintf(c, "burst-%d", i)
		}
		answered := 0
		deadline := time.Now().Add(20 * time.Second)
		b := make([]byte, 256)
		for i, c := range conns {
			// Past the deadline, what has arrived is still read.
			c.SetReadDeadline(later(deadline, time.Now().Add(50*time.Millisecond)))
			k, err := c.Read(b)
			if err == nil && strings.HasSuffix(string(b[:k]), fmt.Sprintf("burst-%d", i)) {
				answered++
			}
		}
		fmt.Printf("answered %d of %d\n", answered, n)
	case "tcp-send-once": // ADDR N: accept one connection, send N zero bytes, close it and exit
		l, err := net.Listen("tcp", args[0])
		if err != nil {
			return fail("%v", err)
		}
		n, _ := strconv.Atoi(args[1])
		fmt.Println("listening")
		c, err := l.Accept()
		if err != nil {
			return fail("%v", err)
		}
		if _, err := c.Write(make([]byte, n)); err != nil {
			return fail("%v", err)
		}
		c.Close()
	case "http-serve": // ADDR [NETWORK]: answer every request with "hello from inside"
		l, err := net.Listen(networkArg(args, "tcp"), args[0])
		if err != nil {
			return fail("%v", err)
		}
		fmt.Println("listening")
		http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(w, "hello from inside")
		}))
	case "udp-serve": // ADDR [NETWORK]: echo datagrams with a prefix
		c, err := net.ListenPacket(networkArg(args, "udp"), args[0])
		if err != nil {
			return fail("%v", err)
		}
		fmt.Println("listening")
		b := make([]byte, 65536)
		for {
			n, from, err := c.ReadFrom(b)
			if err != nil {
				return 0
			}
			c.WriteTo(append([]byte("inside:"), b[:n]...), from)
		}
	case "peer-serve": // NETWORK,ADDR...: tell each TCP connection and UDP datagram who sent it
		if err := peerServe(args); err != nil {
			return fail("%v", err)
		}
	case "stdin-send": // ADDR: send stdin, half-close, wait for the peer's close
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return fail("%v", err)
		}
		n, err := io.Copy(c, os.Stdin)
		if err != nil {
			return fail("send: %v", err)
		}
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
		fmt.Println("sent", n)
	case "stdin-send-then-slow-read": // ADDR: send stdin, then read slowly to EOF
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return fail("%v", err)
		}
		io.Copy(c, os.Stdin)
		b := make([]byte, 16<<10)
		total := 0
		for i := 0; ; i++ {
			n, err := c.Read(b)
			total += n
			if err != nil {
				break
			}
			if i%8 == 0 {
				time.Sleep(time.Millisecond)
			}
		}
		fmt.Println("read", total)
	case "dns-query": // SERVER NAME: one A query over UDP, print the answers
		q := new(mdns.Msg)
		q.SetQuestion(args[1], mdns.TypeA)
		c := &mdns.Client{Timeout: 5 * time.Second}
		r, _, err := c.Exchange(q, args[0])
		if err != nil {
			return fail("%v", err)
		}
		for _, rr := range r.Answer {
			if a, ok := rr.(*mdns.A); ok {
				fmt.Println(a.A)
			}
		}
	default:
		return fail("unknown helper mode %q (args %s)", mode, strings.Join(args, " "))
	}
	return 0
}

// networkArg is the optional NETWORK after ADDR (tcp4, udp6, ...), def if
// absent or empty.
func networkArg(args []string, def string) string {
	if len(args) > 1 && args[1] != "" {
		return args[1]
	}
	return def
}

// peerServe listens on every NETWORK,ADDR given (tcp4, tcp6, udp4, ...),
// prints "listening", and answers "peer=ADDR" with the address it sees the
// peer at (IPv4 unmapped): on TCP, once per connection, then it closes; on
// UDP, to every datagram, from the unconnected listening socket.
func peerServe(args []string) error {
	for _, a := range args {
		network, addr, _ := strings.Cut(a, ",")
		if strings.HasPrefix(network, "tcp") {
			l, err := net.Listen(network, addr)
			if err != nil {
				return err
			}
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					fmt.Fprintf(c, "peer=%s\n", unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort()))
					c.Close()
				}
			}()
			continue
		}
		pc, err := net.ListenPacket(network, addr)
		if err != nil {
			return err
		}
		go func() {
			b := make([]byte, 2048)
			for {
				_, from, err := pc.(*net.UDPConn).ReadFromUDPAddrPort(b)
				if err != nil {
					return
				}
				pc.(*net.UDPConn).WriteToUDPAddrPort(fmt.Appendf(nil, "peer=%s", unmap(from)), from)
			}
		}()
	}
	fmt.Println("listening")
	select {}
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func TestHelperModeUnknown(t *testing.T) {
	if runHelper("no-such-mode", nil) != 1 {
		t.Error("unknown helper mode did not fail")
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// tcpConc opens n connections to addr, 200 at a time, each echoing one
// byte, and keeps them open until the process exits. A refused one is
// counted apart from any other failure (a timeout, a reset later).
func tcpConc(addr string, n int) (held, refused, failed int) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	slots := make(chan struct{}, 200)
	for range n {
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			c, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err == nil {
				c.SetDeadline(time.Now().Add(10 * time.Second))
				b := []byte{'x'}
				if _, err = c.Write(b); err == nil {
					_, err = io.ReadFull(c, b)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				held++
				keep = append(keep, c) // open until the process exits
			case errors.Is(err, syscall.ECONNREFUSED):
				refused++
			default:
				failed++
			}
		}()
	}
	wg.Wait()
	return held, refused, failed
}

var keep []net.Conn
