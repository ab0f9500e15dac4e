// Package pcap records the sandbox's virtual link in a pcap file, for
// tcpdump -r and Wireshark (--pcap): every Ethernet frame in both
// directions as it crossed the TAP device, with the virtio-net header
// stripped, large TCP segments (TSO/GSO, up to 64 KiB) whole as they
// crossed rather than cut to the MTU.
//
// A Writer wraps a tap.Device (Wrap); the network never waits for the file:
// frames are copied into a bounded buffer that a goroutine of the Writer
// writes out, and a frame that finds the buffer full is dropped from the
// capture (and counted), never delayed. The file is bounded too: once it
// would grow past its maximum size, recording stops, with one notice.
package pcap

import (
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gonetns/gonetns/tap"
)

const (
	// SnapLen is the largest frame recorded whole, tcpdump's own maximum:
	// a TSO segment is up to 64 KiB of IP plus the Ethernet header.
	SnapLen = 262144
	// DefaultMaxSize is the default bound of the file (--pcap-max-size).
	DefaultMaxSize = 256 << 20
	// MinMaxSize is the smallest bound accepted: room for the file header
	// and a few large segments.
	MinMaxSize = 1 << 20

	linkTypeEthernet = 1
	// magicNanos marks a pcap file with nanosecond timestamps (libpcap
	// 1.5 and later, Wireshark): at 10 Gbit/s, frames microseconds
	// apart stay distinct.
	magicNanos      = 0xa1b23c4d
	fileHeaderLen   = 24
	recordHeaderLen = 16

	// bufferSize bounds the frames waiting to be written, in each of the
	// two buffers the capture path and the writer goroutine swap: 16 MiB
	// is about 40 ms of a 3 Gbit/s upload, enough for the writer to get
	// the CPU back. Measured here (iperf3 upload at MTU 65520 for 4 s,
	// ~25,000 frames, 2 cores at load average 5): into tmpfs, 4 MiB
	// buffers missed 3,085-5,941 frames, 4 MiB with the yield in record
	// 159-6,320, 16 MiB with it 0-2,207 (two runs of four lost none); the
	// upload ran at 2.6-3.5 Gbit/s in all three (5.8 without --pcap).
	// Into a file on disk (~100 MB/s sustained) the disk is the limit
	// whatever the buffer: 2,000-11,000 frames missed, where blocking
	// would have slowed the sandbox to the disk's speed instead.
	bufferSize = 16 << 20
)

// Stats counts what a Writer recorded.
type Stats struct {
	Frames  int64 // frames recorded
	Bytes   int64 // size of the file, header included
	Dropped int64 // frames not recorded because the writer fell behind
	Full    bool  // the file reached its maximum size; recording stopped
}

// Writer records frames into a pcap file. Create it with New or Create,
// wrap the device with Wrap, start it with Start and stop it with Close.
type Writer struct {
	out     io.WriteCloser
	name    string
	maxSize int64
	log     *slog.Logger
	now     func() time.Time

	stopped atomic.Bool // full, failed or closed: frames are not recorded

	mu       sync.Mutex
	pending  []byte // records waiting for the writer goroutine
	spare    []byte // the other buffer, nil while the goroutine writes it
	size     int64  // bytes taken into the file so far, pending included
	frames   int64
	dropped  int64
	full     bool
	closed   bool
	started  bool
	writeErr error

	wake chan struct{}
	done chan struct{}
}

// Config of a Writer.
type Config struct {
	// MaxSize bounds the file, in bytes; 0 means DefaultMaxSize.
	MaxSize int64
	// Name of the file, for messages.
	Name   string
	Logger *slog.Logger
	// Now is the clock of the timestamps; time.Now when nil.
	Now func() time.Time
}

// Create creates (or truncates) the file at path, readable by its owner
// only (a capture holds everything the sandbox sent and received), and
// returns a Writer for it.
func Create(path string, cfg Config) (*Writer, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create the pcap file: %w", err)
	}
	if cfg.Name == "" {
		cfg.Name = path
	}
	return New(f, cfg), nil
}

// New returns a Writer that records into out, which Close closes. It
// starts nothing and writes nothing yet.
func New(out io.WriteCloser, cfg Config) *Writer {
	w := &Writer{out: out, name: cfg.Name, maxSize: cfg.MaxSize, log: cfg.Logger, now: cfg.Now,
		wake: make(chan struct{}, 1), done: make(chan struct{})}
	if w.maxSize <= 0 {
		w.maxSize = DefaultMaxSize
	}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	if w.now == nil {
		w.now = time.Now
	}
	size := min(int64(bufferSize), w.maxSize)
	w.pending = make([]byte, 0, size)
	w.spare = make([]byte, 0, size)
	w.pending = binary.LittleEndian.AppendUint32(w.pending, magicNanos)
	w.pending = binary.LittleEndian.AppendUint16(w.pending, 2) // version 2.4
	w.pending = binary.LittleEndian.AppendUint16(w.pending, 4)
	w.pending = binary.LittleEndian.AppendUint32(w.pending, 0) // time zone
	w.pending = binary.LittleEndian.AppendUint32(w.pending, 0) // accuracy
	w.pending = binary.LittleEndian.AppendUint32(w.pending, SnapLen)
	w.pending = binary.LittleEndian.AppendUint32(w.pending, linkTypeEthernet)
	w.size = fileHeaderLen
	return w
}

// Start starts the goroutine that writes the file.
func (w *Writer) Start() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.started || w.closed {
		return
	}
	w.started = true
	go w.run()
	w.signal()
}

func (w *Writer) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// run writes what the capture path buffered until Close.
func (w *Writer) run() {
	defer close(w.done)
	noticed := false
	for range w.wake {
		w.mu.Lock()
		buf := w.pending
		w.pending, w.spare = w.spare, nil
		full, closed, failed := w.full, w.closed, w.writeErr != nil
		w.mu.Unlock()
		var err error
		if len(buf) > 0 && !failed {
			_, err = w.out.Write(buf)
		}
		w.mu.Lock()
		w.spare = buf[:0]
		if err != nil {
			w.writeErr = err
			w.stopped.Store(true)
		}
		w.mu.Unlock()
		if err != nil {
			w.log.Error(fmt.Sprintf("pcap: writing %s failed; no more frames are recorded: %v", w.name, err))
		}
		if full && !noticed {
			noticed = true
			w.log.Info(fmt.Sprintf("pcap: %s reached its maximum size (--pcap-max-size=%d); no more frames are recorded", w.name, w.maxSize))
		}
		if closed {
			return
		}
	}
}

// Wrap returns dev with every frame it reads or writes recorded. The
// returned device is dev's in every other respect; closing it closes dev,
// not the Writer.
func (w *Writer) Wrap(dev tap.Device) tap.Device {
	return &device{Device: dev, w: w}
}

var _ tap.Device = (*device)(nil)

type device struct {
	tap.Device
	w *Writer
}

func (d *device) Read(bufs [][]byte) (int, error) {
	n, err := d.Device.Read(bufs)
	if err == nil && !d.w.stopped.Load() {
		d.w.record(bufs, n, d.Device.VNetHdr())
	}
	return n, err
}

// Write records the frame before it is written: the sandbox's kernel may
// take it and answer within the write, and its answer must come after it
// in the file. (A frame the device then refuses, because it is closing,
// is recorded all the same.)
func (d *device) Write(bufs [][]byte) (int, error) {
	if !d.w.stopped.Load() {
		n := 0
		for _, b := range bufs {
			n += len(b)
		}
		d.w.record(bufs, n, d.Device.VNetHdr())
	}
	return d.Device.Write(bufs)
}

// record appends one frame, the first n bytes of bufs less the virtio-net
// header, to the pending buffer; if the buffer is full the frame is
// dropped and counted.
func (w *Writer) record(bufs [][]byte, n int, vnetHdr bool) {
	skip := 0
	if vnetHdr {
		skip = tap.VNetHdrLen
	}
	frameLen := n - skip
	if frameLen <= 0 {
		return
	}
	capLen := min(frameLen, SnapLen)
	recLen := recordHeaderLen + capLen
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed || w.full || w.writeErr != nil {
		return
	}
	if w.size+int64(recLen) > w.maxSize {
		w.full = true
		w.stopped.Store(true)
		w.signal()
		return
	}
	if len(w.pending)+recLen > cap(w.pending) {
		w.dropped++
		w.signal()
		return
	}
	// The time is read under the lock, so records are in time order.
	ts := w.now()
	p := w.pending
	p = binary.LittleEndian.AppendUint32(p, uint32(ts.Unix()))
	p = binary.LittleEndian.AppendUint32(p, uint32(ts.Nanosecond()))
	p = binary.LittleEndian.AppendUint32(p, uint32(capLen))
	p = binary.LittleEndian.AppendUint32(p, uint32(frameLen))
	left := capLen
	for _, b := range bufs {
		if left == 0 {
			break
		}
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		b = b[skip:]
		skip = 0
		if len(b) > left {
			b = b[:left]
		}
		p = append(p, b...)
		left -= len(b)
	}
	w.pending = p
	w.size += int64(recLen)
	w.frames++
	w.signal()
	if len(p) > cap(p)/2 {
		// Half full: let the writer goroutine run now instead of at this
		// one's next preemption (the network process has one P). This
		// yields the CPU; it never waits for the file.
		w.mu.Unlock()
		runtime.Gosched()
		w.mu.Lock()
	}
}

// Stats returns what was recorded so far.
func (w *Writer) Stats() Stats {
	w.mu.Lock()
	defer w.mu.Unlock()
	return Stats{Frames: w.frames, Bytes: w.size, Dropped: w.dropped, Full: w.full}
}

// Close stops recording, writes what is pending, waits for the writer
// goroutine and closes the file. Close the device's users (the stack)
// first, so that their last frames are recorded. Idempotent.
func (w *Writer) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		<-w.done
		return nil
	}
	w.closed = true
	w.stopped.Store(true)
	if !w.started {
		// Never started: write what is pending (the header at least),
		// so that the file is valid.
		w.started = true
		go w.run()
	}
	w.signal()
	w.mu.Unlock()
	<-w.done
	err := w.out.Close()
	st := w.Stats()
	w.log.Debug("pcap closed", "file", w.name, "frames", st.Frames, "bytes", st.Bytes, "dropped", st.Dropped, "full", st.Full)
	if st.Dropped > 0 {
		w.log.Warn(fmt.Sprintf("pcap: %d frames are missing from %s: writing the file could not keep up with the network", st.Dropped, w.name))
	}
	w.mu.Lock()
	werr := w.writeErr
	w.mu.Unlock()
	if werr != nil {
		return fmt.Errorf("pcap %s: %w", w.name, werr)
	}
	if err != nil {
		return fmt.Errorf("pcap %s: %w", w.name, err)
	}
	return nil
}
