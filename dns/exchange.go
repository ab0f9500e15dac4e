package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
)

// exchanger sends one query to one upstream over network ("udp" or "tcp")
// and returns the upstream's answer, which the caller then owns (and
// modifies: it sets the ID). The forwarder checks the answer against the
// query again, so a fake in tests may return anything. query is not
// modified.
//
// exchange returns when an answer arrives, on an error, or when ctx is
// done, whichever comes first; it leaves nothing running behind it.
type exchanger interface {
	exchange(ctx context.Context, network string, upstream netip.AddrPort, query []byte) ([]byte, error)
}

// hostExchanger talks to upstreams with ordinary host sockets: a fresh
// socket per exchange, so the kernel picks a random source port each time.
type hostExchanger struct {
	dialer net.Dialer
}

// udpBufs holds receive buffers big enough for any UDP datagram, so an
// oversized answer is never silently cut.
var udpBufs = sync.Pool{New: func() any { b := make([]byte, 65535); return &b }}

// past is a deadline that has already expired, used to unblock I/O.
var past = time.Unix(1, 0)

func (e *hostExchanger) exchange(ctx context.Context, network string, upstream netip.AddrPort, query []byte) ([]byte, error) {
	h, q, err := question(query)
	if err == nil && q == nil {
		err = errQuestionCount
	}
	if err != nil {
		return nil, fmt.Errorf("exchange with %s: malformed query: %w", upstream, err)
	}
	conn, err := e.dialer.DialContext(ctx, network, upstream.String())
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	// Cancellation unblocks the I/O below; wait for the callback so it
	// never outlives this call.
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		conn.SetDeadline(past)
		close(fired)
	})
	defer func() {
		if !stop() {
			<-fired
		}
	}()

	var reply []byte
	switch network {
	case "udp":
		stopResend := resendUDP(ctx, conn, query)
		reply, err = exchangeUDP(conn, h.id, *q, query)
		stopResend()
	case "tcp":
		reply, err = exchangeTCP(conn, query)
	default:
		return nil, fmt.Errorf("exchange with %s: unknown network %q", upstream, network)
	}
	if err != nil && ctx.Err() != nil {
		// The deadline or cancellation did it; say so rather than "i/o timeout".
		return nil, ctx.Err()
	}
	return reply, err
}

// exchangeUDP sends query on a connected UDP socket and returns the first
// datagram that answers it; datagrams with another ID or question are
// ignored (a late answer to an earlier query, or a spoofing attempt).
func exchangeUDP(conn net.Conn, id uint16, q mdns.Question, query []byte) ([]byte, error) {
	if _, err := conn.Write(query); err != nil {
		return nil, err
	}
	bp := udpBufs.Get().(*[]byte)
	defer udpBufs.Put(bp)
	buf := *bp
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return nil, err
		}
		if _, err := checkReply(id, q, buf[:n]); err != nil {
			continue
		}
		return append([]byte(nil), buf[:n]...), nil
	}
}

// resendUDP sends query on conn again while no answer has come, at a
// quarter and at three quarters of the time ctx leaves (1 s and 3 s into
// the default budget), as a stub resolver resends: a datagram lost on the
// way to the upstream or back costs a second, not the whole budget and a
// SERVFAIL. The client's own resends do not reach the upstream (see
// Server.serveUDP). An answer to any copy answers the query (one socket,
// one ID). The returned stop ends the resending; once it returns nothing
// is left running.
func resendUDP(ctx context.Context, conn net.Conn, query []byte) (stop func()) {
	dl, ok := ctx.Deadline()
	if !ok {
		return func() {}
	}
	left := time.Until(dl)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTimer(left / 4)
		defer t.Stop()
		for _, next := range []time.Duration{left / 2, 0} {
			select {
			case <-t.C:
			case <-done:
				return
			}
			conn.Write(query)
			if next == 0 {
				return
			}
			t.Reset(next)
		}
	}()
	return func() {
		close(done)
		wg.Wait()
	}
}

// exchangeTCP sends query with the 2-byte length prefix of RFC 1035
// section 4.2.2 and reads one framed answer.
func exchangeTCP(conn net.Conn, query []byte) ([]byte, error) {
	if len(query) > 0xFFFF {
		return nil, errors.New("query longer than 65535 bytes")
	}
	frame := make([]byte, 2+len(query))
	binary.BigEndian.PutUint16(frame, uint16(len(query)))
	copy(frame[2:], query)
	if _, err := conn.Write(frame); err != nil {
		return nil, err
	}
	var lenBuf [2]byte
	if _, err := io.ReadFull(conn, lenBuf[:]); err != nil {
		return nil, err
	}
	reply := make([]byte, binary.BigEndian.Uint16(lenBuf[:]))
	if _, err := io.ReadFull(conn, reply); err != nil {
		return nil, err
	}
	return reply, nil
}
