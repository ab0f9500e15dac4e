package nat

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/stack"
)

// HandleTCP forwards one connection of the sandbox: it dials the
// destination on the host first and completes the sandbox's handshake only
// when that succeeded, so a refused or unreachable destination is answered
// with a reset (ECONNREFUSED inside) instead of accept-then-close. Use it as
// stack.Config.TCP.
func (n *NAT) HandleTCP(r *stack.TCPRequest) {
	if !n.begin() {
		r.Refuse()
		return
	}
	defer n.wg.Done()
	log := n.log.With("src", r.Src, "dst", r.Dst)
	host, err := n.hostAddr(r.Dst.Addr())
	if err != nil {
		log.Debug("tcp refused by policy", "err", err)
		r.Refuse()
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.DialTimeout)
	hc, err := n.dialer.DialContext(ctx, "tcp", netip.AddrPortFrom(host, r.Dst.Port()).String())
	cancel()
	if err != nil {
		log.Debug("tcp dial failed; resetting", "err", err)
		r.Refuse()
		return
	}
	gc, err := r.Accept()
	if err != nil {
		log.Debug("tcp handshake with the sandbox failed", "err", err)
		hc.Close()
		return
	}
	rl := &tcpRelay{guest: gc, host: hc.(*net.TCPConn)}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		rl.abort()
		return
	}
	n.tcp[rl] = struct{}{}
	n.mu.Unlock()
	log.Debug("tcp connected", "host", hc.RemoteAddr())
	up, down := rl.run()
	n.mu.Lock()
	delete(n.tcp, rl)
	n.mu.Unlock()
	log.Debug("tcp closed", "bytes_out", up, "bytes_in", down)
}

// tcpRelay copies between a netstack connection and a host socket, each
// direction on its own: EOF on one side becomes a half-close (FIN) on the
// other, and an error (a reset) on either side resets both.
type tcpRelay struct {
	guest     *stack.TCPConn
	host      *net.TCPConn
	abortOnce sync.Once
}

func (r *tcpRelay) run() (up, down int64) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		var err error
		up, err = r.guest.WriteTo(r.host)
		if err != nil {
			r.abort()
			return
		}
		r.host.CloseWrite()
	}()
	var err error
	down, err = r.hostToGuest()
	if err != nil {
		r.abort()
	} else {
		r.guest.CloseWrite()
	}
	<-done
	r.guest.Close()
	r.host.Close()
	return up, down
}

// hostToGuest copies the host side to the sandbox. A relay buffer is taken
// only once data is waiting, so idle connections hold no buffer.
func (r *tcpRelay) hostToGuest() (int64, error) {
	rc, err := r.host.SyscallConn()
	if err != nil {
		return 0, err
	}
	var total int64
	var buf []byte
	for {
		if buf == nil {
			if err := waitReadable(rc); err != nil {
				return total, err
			}
			buf = getBuf()
		}
		n, err := r.host.Read(buf)
		if n > 0 {
			m, werr := r.guest.Write(buf[:n])
			total += int64(m)
			if werr != nil {
				putBuf(buf)
				return total, werr
			}
		}
		if err != nil {
			putBuf(buf)
			if errors.Is(err, io.EOF) {
				return total, nil
			}
			return total, err
		}
		if n < len(buf) {
			putBuf(buf)
			buf = nil
		}
	}
}

// abort resets both sides.
func (r *tcpRelay) abort() {
	r.abortOnce.Do(func() {
		r.host.SetLinger(0)
		r.host.Close()
		r.guest.Abort()
	})
}

// waitReadable blocks until the socket has data, EOF or an error, without
// consuming data. A pending error is returned: the kernel reports it once,
// so the peek consumes it.
func waitReadable(rc syscall.RawConn) error {
	var one [1]byte
	var perr error
	err := rc.Read(func(fd uintptr) bool {
		_, _, perr = unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return perr != unix.EAGAIN
	})
	if err != nil {
		return err
	}
	return perr
}

const bufSize = 256 << 10

var bufs = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

func getBuf() []byte  { return *(bufs.Get().(*[]byte)) }
func putBuf(b []byte) { bufs.Put(&b) }
