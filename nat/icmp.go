package nat

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/rawconn"
	"github.com/gonetns/gonetns/internal/sockaddr"
	"github.com/gonetns/gonetns/stack"
)

type echoKey struct {
	src, dst netip.Addr
	id       uint16
}

// echoFlow is one ping session of the sandbox (source, destination, echo
// id) and the host ping socket that carries it. The kernel picks the echo
// id on the host (the socket's "port"); replies are mapped back to the
// sandbox's id by Reply.
type echoFlow struct {
	req  *stack.EchoRequest // the first request: replies are sent through it
	sock *os.File
	rc   syscall.RawConn
	host netip.Addr
	to   unix.Sockaddr // host, as sendto takes it
	now  func() time.Time
	last atomic.Int64
	once sync.Once
}

func (f *echoFlow) LastActive() time.Time { return time.Unix(0, f.last.Load()) }

func (f *echoFlow) Close() { f.once.Do(func() { f.sock.Close() }) }

// HandleEcho forwards an ICMP echo request through an unprivileged ping
// socket (net.ipv4.ping_group_range must include the user's group). It
// never answers on the host's behalf: a destination that does not reply
// gets no reply. Requests to the gateway go to the host's loopback; when
// that is disabled or ping sockets are not allowed, the stack answers for
// the gateway itself. A destination the egress policy refuses gets ICMP
// "administratively prohibited". Use it as stack.Config.Echo.
func (n *NAT) HandleEcho(r *stack.EchoRequest) bool {
	host, err := n.hostAddr(r.Dst)
	if err != nil {
		return false // the stack answers for its own addresses, nobody else does
	}
	if !n.allowed("icmp", r.Dst, host) {
		r.Prohibit()
		return true
	}
	if n.pingBlocked.Load() {
		n.debugBlockedOnce(echoKey{r.Src, r.Dst, r.ID})
		return false
	}
	key := echoKey{r.Src, r.Dst, r.ID}
	f, ok := n.echo.Get(key)
	if !ok {
		if f, err = n.newEchoFlow(r, host); err != nil {
			if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
				n.debugBlockedOnce(key)
				n.pingOnce.Do(func() {
					n.pingBlocked.Store(true)
					n.log.Info(fmt.Sprintf("ping from the sandbox reaches only the gateway: "+
						"ping sockets are not allowed for group %d (net.ipv4.ping_group_range=%s). "+
						"To forward ICMP echo: sudo sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"", os.Getgid(), n.pingRange))
				})
				return false
			}
			n.log.Debug("icmp echo not forwarded", "src", r.Src, "dst", r.Dst, "err", err)
			return false
		}
	}
	f.last.Store(n.cfg.Now().UnixNano())
	if err := f.send(r); err != nil {
		n.log.Debug("icmp echo send failed", "dst", host, "err", err)
		// No route to it, or (once the host's kernel gave up on its
		// neighbour) no answer on its link: the sandbox is told, as
		// the host's ping is.
		r.Unreachable(err)
	}
	return true
}

// pingRange reads net.ipv4.ping_group_range, for the notice of refused
// ping sockets. Read when the NAT is made: later the network process may
// be confined to its state directory (package confine).
func pingRange() string {
	b, _ := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
	return strings.Join(strings.Fields(string(b)), " ")
}

func (n *NAT) newEchoFlow(r *stack.EchoRequest, host netip.Addr) (*echoFlow, error) {
	family, proto := unix.AF_INET, unix.IPPROTO_ICMP
	if host.Is6() {
		family, proto = unix.AF_INET6, unix.IPPROTO_ICMPV6
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, fmt.Errorf("ping socket: %w", err)
	}
	if err := n.out.bind(fd, host, false); err != nil {
		unix.Close(fd)
		return nil, err
	}
	to, err := sockaddr.Of(netip.AddrPortFrom(host, 0))
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	sock := os.NewFile(uintptr(fd), "ping")
	rc, err := sock.SyscallConn()
	if err != nil {
		sock.Close()
		return nil, err
	}
	if !n.begin() {
		sock.Close()
		return nil, net.ErrClosed
	}
	f := &echoFlow{req: r, sock: sock, rc: rc, host: host, to: to, now: n.cfg.Now}
	f.last.Store(n.cfg.Now().UnixNano())
	key := echoKey{r.Src, r.Dst, r.ID}
	n.echo.Add(key, f)
	n.log.Debug("icmp echo flow", "src", r.Src, "dst", r.Dst, "id", r.ID, "host", host)
	go func() {
		defer n.wg.Done()
		f.readReplies()
		f.Close()
		n.echo.Remove(key, f)
	}()
	return f, nil
}

// send writes one echo request (the kernel sets the id).
func (f *echoFlow) send(r *stack.EchoRequest) error {
	msg := make([]byte, 8+len(r.Data))
	if f.host.Is4() {
		msg[0] = 8 // echo request
	} else {
		msg[0] = 128
	}
	msg[6], msg[7] = byte(r.Seq>>8), byte(r.Seq)
	copy(msg[8:], r.Data)
	_, err := rawconn.Write(f.rc, func(fd int) (int, error) { return 0, unix.Sendto(fd, msg, 0, f.to) })
	return err
}

// readReplies passes echo replies to the sandbox until the socket closes.
func (f *echoFlow) readReplies() {
	buf := make([]byte, 65536)
	for {
		n, err := rawconn.Read(f.rc, func(fd int) (int, error) {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			return n, err
		})
		if err != nil {
			var errno syscall.Errno
			if !errors.As(err, &errno) {
				return // the poller's error: the socket was closed
			}
			continue // an ICMP error about an earlier request
		}
		if n < 8 {
			continue
		}
		typ := buf[0]
		if (f.host.Is4() && typ != 0) || (f.host.Is6() && typ != 129) {
			continue
		}
		f.last.Store(f.now().UnixNano())
		seq := uint16(buf[6])<<8 | uint16(buf[7])
		f.req.Reply(seq, append([]byte(nil), buf[8:n]...))
	}
}

// debugBlockedOnce says at debug level, once per ping session, that an echo
// request was not forwarded because ping sockets are not allowed.
func (n *NAT) debugBlockedOnce(k echoKey) {
	if !n.log.Enabled(n.ctx, slog.LevelDebug) {
		return
	}
	n.mu.Lock()
	if n.blockedSeen == nil || len(n.blockedSeen) >= 4096 {
		n.blockedSeen = make(map[echoKey]struct{})
	}
	_, seen := n.blockedSeen[k]
	n.blockedSeen[k] = struct{}{}
	n.mu.Unlock()
	if !seen {
		n.log.Debug("icmp echo not forwarded: ping sockets are not allowed (net.ipv4.ping_group_range)", "src", k.src, "dst", k.dst, "id", k.id)
	}
}
