// Package link is the gVisor link endpoint over a tap.Device, shared by the
// stack and by its test twin.
package link

import (
	"encoding/binary"
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/gonetns/gonetns/tap"
)

// virtio_net_hdr fields (include/uapi/linux/virtio_net.h).
const (
	vnetFlagNeedsCsum = 1
	vnetGSONone       = 0
	vnetGSOTCPv4      = 1
	vnetGSOTCPv6      = 4
)

// gsoMaxSize bounds the TCP segments the stack hands down with host GSO:
// the kernel takes up to 64 KB per segment from a TAP.
const gsoMaxSize = 1 << 16

// rxBufSizes are the buffers one frame is read into: a small one that
// holds a whole short frame (an ACK, a 1500-byte packet) and the headers of
// a long one, and a large one for the rest of a frame of up to 64 KB (a GSO
// segment, or a frame at MTU 65520). Only the buffers a frame fills are
// handed to the stack; the others are reused for the next frame. Two views
// per large frame keep pool traffic and the iovecs of the onward writev
// low.
var rxBufSizes = []int{2048, 65536 - 2048}

// Endpoint connects a tap.Device to the gVisor stack: Ethernet framing,
// and, when the device carries a virtio_net_hdr, checksum offload in both
// directions and host GSO (TCP segments up to 64 KB, cut into MSS-sized
// packets by the kernel only if they ever leave the machine).
type Endpoint struct {
	dev  tap.Device
	vnet bool
	mac  tcpip.LinkAddress

	mu         sync.RWMutex
	mtu        uint32
	dispatcher stack.NetworkDispatcher

	wg sync.WaitGroup
	// onError is called once if the device fails for a reason other than
	// being closed.
	onError func(error)

	later later // frames written by the writer goroutine (later.go)

	fast atomic.Pointer[FastPath]

	idle       *idleWatch   // SetIdle
	external   tap.Pollable // the device, when a loop of the caller's reads it (SetExternalReader)
	pumpRx     *rx          // Pump's buffers
	readerDone sync.Once
}

// FastPath sees each frame before the stack does, on the reader
// goroutine: vnetHdr is the frame's virtio-net header (nil without one);
// head is the frame's first buffer (2 KiB; it starts with the Ethernet
// header and holds all the headers of any frame a kernel builds) and tail
// the rest of a longer frame (nil when the frame fit). It returns true
// when it took the frame, which the stack then never sees; the frame's
// bytes are valid only during the call.
type FastPath func(vnetHdr, head, tail []byte) bool

// SetFastPath installs f (nil removes it).
func (e *Endpoint) SetFastPath(f FastPath) {
	if f == nil {
		e.fast.Store(nil)
		return
	}
	e.fast.Store(&f)
}

var (
	_ stack.LinkEndpoint = (*Endpoint)(nil)
	_ stack.GSOEndpoint  = (*Endpoint)(nil)
)

// New makes an endpoint for dev; onError is called once if reading the
// device fails for another reason than its being closed. Nothing starts
// until the stack attaches the endpoint.
func New(dev tap.Device, mtu uint32, mac tcpip.LinkAddress, onError func(error)) *Endpoint {
	e := &Endpoint{dev: dev, vnet: dev.VNetHdr(), mac: mac, mtu: mtu, onError: onError}
	e.later.init()
	return e
}

func (e *Endpoint) MTU() uint32 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.mtu
}

func (e *Endpoint) SetMTU(mtu uint32) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.mtu = mtu
}

func (e *Endpoint) MaxHeaderLength() uint16 { return header.EthernetMinimumSize }

func (e *Endpoint) LinkAddress() tcpip.LinkAddress { return e.mac }

func (e *Endpoint) SetLinkAddress(tcpip.LinkAddress) {}

func (e *Endpoint) Capabilities() stack.LinkEndpointCapabilities {
	c := stack.CapabilityResolutionRequired
	if e.vnet {
		// The sandbox's kernel sends partial checksums (NEEDS_CSUM) for
		// TCP and UDP; frames never cross a wire, so nothing to verify.
		c |= stack.CapabilityRXChecksumOffload
	}
	return c
}

func (e *Endpoint) GSOMaxSize() uint32 {
	if e.vnet {
		return gsoMaxSize
	}
	return 0
}

func (e *Endpoint) SupportedGSO() stack.SupportedGSO {
	if e.vnet {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

// Attach starts (or, with nil, stops delivering from) the reader
// goroutine (unless SetExternalReader), the writer of deferred frames and
// the idle watch's goroutine (SetIdle). The reader ends when the device is
// closed, the others when the device is read no more (ReaderDone); Wait
// waits for them.
func (e *Endpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	old := e.dispatcher
	e.dispatcher = d
	e.mu.Unlock()
	if d != nil && old == nil {
		e.later.mu.Lock()
		e.later.running = true
		e.later.mu.Unlock()
		if e.external == nil {
			e.wg.Add(1)
			go e.readLoop()
		}
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			e.later.run(e.writeFrame)
		}()
		if e.idle != nil && !e.idle.started.Swap(true) {
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				e.idle.serve()
			}()
		}
	}
}

func (e *Endpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

func (e *Endpoint) Wait() { e.wg.Wait() }

func (e *Endpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

func (e *Endpoint) AddHeader(pkt *stack.PacketBuffer) {
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	src := pkt.EgressRoute.LocalLinkAddress
	if src == "" {
		src = e.mac
	}
	eth.Encode(&header.EthernetFields{
		SrcAddr: src,
		DstAddr: pkt.EgressRoute.RemoteLinkAddress,
		Type:    pkt.NetworkProtocolNumber,
	})
}

func (e *Endpoint) ParseHeader(pkt *stack.PacketBuffer) bool {
	hdr, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	if !ok {
		return false
	}
	pkt.NetworkProtocolNumber = header.Ethernet(hdr).Type()
	return true
}

func (e *Endpoint) Close() {}

func (e *Endpoint) SetOnCloseAction(func()) {}

// WritePackets writes each packet as one frame: virtio_net_hdr (when the
// device has one), Ethernet header, network and transport headers and
// payload, gathered in one writev. Some TCP segments are written a little
// later by the writer goroutine, or not at all when a later one says the
// same (later.go).
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		if e.later.deferWrite(pkt) {
			n++
			continue
		}
		if err := e.writeFrame(pkt); err != nil {
			if n == 0 {
				return 0, writeError(err)
			}
			break
		}
		n++
	}
	return n, nil
}

// frameIO is the scratch of one write: the virtio-net header and the I/O
// vector. Pooled: on the stack they would escape (the device is an
// interface), and pkt.AsSlices makes a slice of its own; 3 objects per
// frame the stack sends, before.
type frameIO struct {
	hdr  [tap.VNetHdrLen]byte
	bufs [8][]byte
}

var frameIOs = sync.Pool{New: func() any { return new(frameIO) }}

// writeFrame writes one packet to the device.
func (e *Endpoint) writeFrame(pkt *stack.PacketBuffer) error {
	scratch := frameIOs.Get().(*frameIO)
	defer frameIOs.Put(scratch)
	bufs := scratch.bufs[:0]
	if e.vnet {
		encodeVNetHdr(scratch.hdr[:], pkt)
		bufs = append(bufs, scratch.hdr[:])
	}
	views, skip := pkt.AsViewList() // the views from the packet's headers on
	for v := views.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		bufs = append(bufs, b[skip:])
		skip = 0
	}
	_, err := e.dev.Write(bufs)
	clear(scratch.bufs[:]) // the pool keeps no packet alive
	return err
}

func writeError(err error) tcpip.Error {
	if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
		return &tcpip.ErrClosedForSend{}
	}
	return &tcpip.ErrAborted{}
}

// encodeVNetHdr describes pkt's offloads: a partial TCP checksum for the
// kernel to finish, and for a segment longer than the MSS, the TSO type and
// size so the kernel treats it as one large segment.
func encodeVNetHdr(b []byte, pkt *stack.PacketBuffer) {
	clear(b)
	gso := pkt.GSOOptions
	if gso.Type == stack.GSONone {
		return
	}
	binary.LittleEndian.PutUint16(b[2:], uint16(pkt.HeaderSize()))
	if gso.NeedsCsum {
		b[0] = vnetFlagNeedsCsum
		binary.LittleEndian.PutUint16(b[6:], header.EthernetMinimumSize+gso.L3HdrLen)
		binary.LittleEndian.PutUint16(b[8:], gso.CsumOffset)
	}
	if pkt.Data().Size() > int(gso.MSS) {
		switch gso.Type {
		case stack.GSOTCPv4:
			b[1] = vnetGSOTCPv4
		case stack.GSOTCPv6:
			b[1] = vnetGSOTCPv6
		}
		binary.LittleEndian.PutUint16(b[4:], gso.MSS)
	}
}

// yieldEvery is how many frames the reader handles before it lets other
// goroutines run. Under a flood the TAP never runs dry, so the reader
// would otherwise keep the P until the scheduler preempts it, 10 ms later,
// while the goroutines sending the answers and the host's data wait.
// Measured after the UDP packet path landed (MTU 1500, medians of 3
// interleaved rounds): a sandbox -> host UDP flood got 0.63, 0.69, 0.61
// and 0.62 Gbit/s yielding every 16, 64, 256 frames and never, bulk TCP
// 9.0, 8.3, 8.2 and 8.5 Gbit/s: within this machine's noise, so the
// value rests on the reason above.
const yieldEvery = 64

// rx holds the buffers the next frame is read into: the virtio-net header
// and the views (rxBufSizes) a frame the stack takes keeps.
type rx struct {
	hdr   [tap.VNetHdrLen]byte
	views []*buffer.View
	iov   [][]byte
}

func newRx() *rx {
	return &rx{views: make([]*buffer.View, len(rxBufSizes)), iov: make([][]byte, 0, len(rxBufSizes)+1)}
}

// buffers returns the I/O vector for the next frame.
func (r *rx) buffers(vnet bool) [][]byte {
	r.iov = r.iov[:0]
	if vnet {
		r.iov = append(r.iov, r.hdr[:])
	}
	for i, v := range r.views {
		if v == nil {
			v = buffer.NewViewSize(rxBufSizes[i])
			r.views[i] = v
		}
		r.iov = append(r.iov, v.AsSlice())
	}
	return r.iov
}

func (r *rx) release() {
	for i, v := range r.views {
		if v != nil {
			v.Release()
			r.views[i] = nil
		}
	}
}

// readError reports a read that failed for another reason than the
// device's being closed.
func (e *Endpoint) readError(err error) {
	if !errors.Is(err, net.ErrClosed) && !errors.Is(err, os.ErrClosed) && e.onError != nil {
		e.onError(err)
	}
}

// readLoop reads frames until the device is closed and hands each to the
// stack on this goroutine. Its end stops the writer goroutine.
func (e *Endpoint) readLoop() {
	defer e.wg.Done()
	defer e.ReaderDone()
	r := newRx()
	defer r.release()
	for frames := 1; ; frames++ {
		if frames%yieldEvery == 0 {
			runtime.Gosched()
		}
		n, err := e.dev.Read(r.buffers(e.vnet))
		if err != nil {
			e.readError(err)
			return
		}
		e.frame(r, n)
	}
}

// SetExternalReader makes a loop of the caller's the reader of the device
// (a tap.Pollable): Attach then starts no reader goroutine, and the loop
// calls Pump when the device's descriptor is readable, then ReaderDone
// once it reads no more. Call it before the stack attaches the endpoint;
// false, and nothing changes, if the device is no tap.Pollable.
func (e *Endpoint) SetExternalReader() bool {
	dev, ok := e.dev.(tap.Pollable)
	if ok {
		e.external, e.pumpRx = dev, newRx()
	}
	return ok
}

// Pump reads the frames waiting on the device, at most max, without
// waiting, and hands each on as the reader goroutine does. It returns how
// many it read, and an error (after which it must not be called again)
// when the device failed or was closed. One caller at a time.
func (e *Endpoint) Pump(max int) (int, error) {
	r := e.pumpRx
	for i := 0; i < max; i++ {
		n, err := e.external.ReadNow(r.buffers(e.vnet))
		if errors.Is(err, unix.EAGAIN) {
			return i, nil
		}
		if err != nil {
			e.readError(err)
			return i, err
		}
		e.frame(r, n)
	}
	return max, nil
}

// ReaderDone tells the endpoint that the device is read no more (the
// reader goroutine's end, or an external loop's): it stops the writer of
// deferred frames. Idempotent.
func (e *Endpoint) ReaderDone() {
	e.readerDone.Do(func() {
		close(e.later.stop)
		if e.pumpRx != nil {
			e.pumpRx.release()
		}
		if e.idle != nil {
			e.idle.close()
		}
	})
}

// frame hands on a frame of n bytes just read into r: to the fast path,
// else to the stack, which keeps the views it fills.
func (e *Endpoint) frame(r *rx, n int) {
	if e.idle != nil {
		e.idle.frame()
	}
	if e.vnet {
		n -= tap.VNetHdrLen
	}
	if n < header.EthernetMinimumSize {
		return
	}
	if fp := e.fast.Load(); fp != nil {
		var vh []byte
		if e.vnet {
			vh = r.hdr[:]
		}
		head, tail := r.views[0].AsSlice(), []byte(nil)
		if n <= len(head) {
			head = head[:n]
		} else {
			tail = r.views[1].AsSlice()[:n-len(head)]
		}
		if (*fp)(vh, head, tail) {
			return // taken: the buffers serve the next frame
		}
	}
	// Take the buffers the frame filled; the next read gets new ones.
	var payload buffer.Buffer
	for i := 0; n > 0; i++ {
		v := r.views[i]
		r.views[i] = nil
		if n < v.Size() {
			v.CapLength(n)
		}
		n -= v.Size()
		payload.Append(v)
	}
	e.deliver(payload)
}

func (e *Endpoint) deliver(payload buffer.Buffer) {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
	defer pkt.DecRef()
	hdrBytes, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	if !ok {
		return
	}
	eth := header.Ethernet(hdrBytes)
	dst := eth.DestinationAddress()
	if dst != e.mac && !header.IsMulticastEthernetAddress(dst) && dst != header.EthernetBroadcastAddress {
		return
	}
	proto := eth.Type()
	pkt.NetworkProtocolNumber = proto
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d != nil {
		d.DeliverNetworkPacket(proto, pkt)
	}
}
