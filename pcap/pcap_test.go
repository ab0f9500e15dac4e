package pcap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/tap/taptest"
)

// udpFrame is an Ethernet frame with an IPv4/UDP datagram of payloadLen
// bytes from 10.0.2.100:port to 10.0.2.2:9 (checksums left zero).
func udpFrame(port uint16, payloadLen int) []byte {
	f := make([]byte, 14+20+8+payloadLen)
	copy(f[0:6], []byte{0x52, 0x55, 0x0a, 0x00, 0x02, 0x02})
	copy(f[6:12], []byte{0x02, 0, 0, 0, 0, 0x64})
	f[12], f[13] = 0x08, 0x00
	ip := f[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(min(20+8+payloadLen, 0xffff)))
	ip[8], ip[9] = 64, 17
	copy(ip[12:16], []byte{10, 0, 2, 100})
	copy(ip[16:20], []byte{10, 0, 2, 2})
	udp := ip[20:]
	binary.BigEndian.PutUint16(udp[0:], port)
	binary.BigEndian.PutUint16(udp[2:], 9)
	binary.BigEndian.PutUint16(udp[4:], uint16(min(8+payloadLen, 0xffff)))
	for i := range payloadLen {
		udp[8+i] = byte(i)
	}
	return f
}

// record is one parsed pcap record.
type record struct {
	ts      time.Time
	data    []byte
	origLen int
}

// parse reads a pcap file as written by Writer; it fails the test on
// anything unexpected.
func parse(t *testing.T, b []byte) []record {
	t.Helper()
	if len(b) < fileHeaderLen {
		t.Fatalf("pcap file of %d bytes has no header", len(b))
	}
	le := binary.LittleEndian
	if le.Uint32(b) != magicNanos || le.Uint16(b[4:]) != 2 || le.Uint16(b[6:]) != 4 || le.Uint32(b[16:]) != SnapLen || le.Uint32(b[20:]) != linkTypeEthernet {
		t.Fatalf("pcap file header % x", b[:fileHeaderLen])
	}
	var recs []record
	for b = b[fileHeaderLen:]; len(b) > 0; {
		if len(b) < recordHeaderLen {
			t.Fatalf("truncated record header")
		}
		capLen, origLen := int(le.Uint32(b[8:])), int(le.Uint32(b[12:]))
		if len(b) < recordHeaderLen+capLen || capLen > origLen {
			t.Fatalf("record of %d/%d bytes with %d left", capLen, origLen, len(b))
		}
		recs = append(recs, record{
			ts:      time.Unix(int64(le.Uint32(b)), int64(le.Uint32(b[4:]))),
			data:    b[recordHeaderLen : recordHeaderLen+capLen],
			origLen: origLen,
		})
		b = b[recordHeaderLen+capLen:]
	}
	return recs
}

type bufCloser struct {
	mu     sync.Mutex
	b      bytes.Buffer
	closed bool
}

func (c *bufCloser) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b.Write(p)
}

func (c *bufCloser) Close() error { c.mu.Lock(); c.closed = true; c.mu.Unlock(); return nil }

func (c *bufCloser) Bytes() []byte { c.mu.Lock(); defer c.mu.Unlock(); return bytes.Clone(c.b.Bytes()) }

func vnetHdr() []byte { return make([]byte, tap.VNetHdrLen) }

// Frames in both directions are recorded without the virtio-net header,
// however the header and frame are scattered over the buffers, large ones
// whole.
func TestRecordsBothWays(t *testing.T) {
	a, b := taptest.Pipe(true, 16)
	out := &bufCloser{}
	w := New(out, Config{})
	w.Start()
	dev := w.Wrap(a)
	small, large := udpFrame(1000, 100), udpFrame(1001, 65507)
	// Written: header and frame in separate buffers, as the stack does.
	if _, err := dev.Write([][]byte{vnetHdr(), small[:20], small[20:]}); err != nil {
		t.Fatal(err)
	}
	if _, err := dev.Write([][]byte{vnetHdr(), large}); err != nil {
		t.Fatal(err)
	}
	// Read: the header split across buffers.
	go b.Write([][]byte{vnetHdr(), small})
	hdr1, hdr2, body := make([]byte, 4), make([]byte, 10), make([]byte, 70000)
	n, err := dev.Read([][]byte{hdr1, hdr2, body})
	if err != nil || n != tap.VNetHdrLen+len(small) {
		t.Fatalf("read %d, %v", n, err)
	}
	for range 2 {
		b.Read([][]byte{make([]byte, 70000)}) // drain what dev wrote
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !out.closed {
		t.Error("Close did not close the file")
	}
	recs := parse(t, out.Bytes())
	want := [][]byte{small, large, small}
	if len(recs) != len(want) {
		t.Fatalf("%d records, want %d", len(recs), len(want))
	}
	for i, r := range recs {
		if !bytes.Equal(r.data, want[i]) || r.origLen != len(want[i]) {
			t.Errorf("record %d: %d bytes (orig %d), want the %d-byte frame", i, len(r.data), r.origLen, len(want[i]))
		}
		if i > 0 && r.ts.Before(recs[i-1].ts) {
			t.Errorf("record %d is older than the one before", i)
		}
	}
	if st := w.Stats(); st.Frames != 3 || st.Dropped != 0 || st.Full || st.Bytes != int64(len(out.Bytes())) {
		t.Errorf("stats %+v for a %d-byte file", st, len(out.Bytes()))
	}
}

// tcpdump reads the file and decodes what is in it.
func TestTcpdumpReads(t *testing.T) {
	tcpdump, err := exec.LookPath("tcpdump")
	if err != nil {
		t.Fatal("tcpdump is not installed (apt-get install tcpdump; scripts/test-setup.sh installs it)")
	}
	path := filepath.Join(t.TempDir(), "link.pcap")
	w, err := Create(path, Config{})
	if err != nil {
		t.Fatal(err)
	}
	w.Start()
	a, b := taptest.Pipe(false, 16)
	dev := w.Wrap(a)
	dev.Write([][]byte{udpFrame(4242, 10)})
	dev.Write([][]byte{udpFrame(4243, 65000)})
	b.Read([][]byte{make([]byte, 70000)})
	b.Read([][]byte{make([]byte, 70000)})
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Errorf("pcap file mode %04o, want 0600", st.Mode().Perm())
	}
	out, err := exec.Command(tcpdump, "-nn", "-r", path).CombinedOutput()
	if err != nil {
		t.Fatalf("tcpdump -r: %v\n%s", err, out)
	}
	for _, want := range []string{"10.0.2.100.4242 > 10.0.2.2.9: UDP, length 10", "10.0.2.100.4243 > 10.0.2.2.9: UDP, length 65000"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("tcpdump -r does not show %q:\n%s", want, out)
		}
	}
}

// Recording stops before the file would pass its maximum size, with one
// notice.
func TestMaxSize(t *testing.T) {
	out := &bufCloser{}
	var logs bytes.Buffer
	var logMu sync.Mutex
	log := slog.New(slog.NewTextHandler(lockedWriter{&logMu, &logs}, nil))
	w := New(out, Config{MaxSize: MinMaxSize, Logger: log})
	w.Start()
	a, b := taptest.Pipe(false, 1024)
	go func() {
		for {
			if _, err := b.Read([][]byte{make([]byte, 70000)}); err != nil {
				return
			}
		}
	}()
	defer a.Close()
	dev := w.Wrap(a)
	frame := udpFrame(1, 60000)
	for range 40 { // 2.4 MB offered
		dev.Write([][]byte{frame})
	}
	w.Close()
	size := len(out.Bytes())
	recs := parse(t, out.Bytes())
	if size > MinMaxSize || size+recordHeaderLen+len(frame) <= MinMaxSize {
		t.Errorf("file of %d bytes (%d records), want the most records that fit in %d", size, len(recs), MinMaxSize)
	}
	if st := w.Stats(); !st.Full || st.Frames != int64(len(recs)) {
		t.Errorf("stats %+v with %d records in the file", st, len(recs))
	}
	logMu.Lock()
	defer logMu.Unlock()
	if n := strings.Count(logs.String(), "reached its maximum size"); n != 1 {
		t.Errorf("%d notices of the maximum size, want 1:\n%s", n, logs.String())
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// stuckFile blocks every Write until released: a disk that cannot keep up.
type stuckFile struct {
	release chan struct{}
	bufCloser
}

func (s *stuckFile) Write(p []byte) (int, error) {
	<-s.release
	return s.bufCloser.Write(p)
}

// When the file cannot keep up, frames are dropped from the capture and
// counted; the device never waits for the file.
func TestSlowFileDropsNotBlocks(t *testing.T) {
	out := &stuckFile{release: make(chan struct{})}
	w := New(out, Config{})
	w.Start()
	a, b := taptest.Pipe(false, 1024)
	go func() {
		for {
			if _, err := b.Read([][]byte{make([]byte, 70000)}); err != nil {
				return
			}
		}
	}()
	defer a.Close()
	dev := w.Wrap(a)
	frame := udpFrame(1, 60000)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 600 { // 36 MB, more than both buffers hold
			dev.Write([][]byte{frame})
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("writes through the device waited for the stuck file")
	}
	close(out.release)
	w.Close()
	st := w.Stats()
	recs := parse(t, out.Bytes())
	if st.Dropped == 0 || st.Frames+st.Dropped != 600 || int64(len(recs)) != st.Frames {
		t.Errorf("stats %+v, %d records in the file", st, len(recs))
	}
}

// Reads and writes from several goroutines at once are all recorded, each
// record whole.
func TestConcurrent(t *testing.T) {
	out := &bufCloser{}
	w := New(out, Config{})
	w.Start()
	a, b := taptest.Pipe(false, 4096)
	da, db := w.Wrap(a), w.Wrap(b)
	var wg sync.WaitGroup
	const perSide = 200
	for i, d := range []tap.Device{da, db} {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for j := range perSide {
				d.Write([][]byte{udpFrame(uint16(i*1000+j), 1000+j)})
			}
		}()
		go func() {
			defer wg.Done()
			for range perSide {
				d.Read([][]byte{make([]byte, 70000)})
			}
		}()
	}
	wg.Wait()
	w.Close()
	recs := parse(t, out.Bytes())
	if len(recs) != 4*perSide {
		t.Fatalf("%d records, want %d", len(recs), 4*perSide)
	}
	for _, r := range recs {
		port := binary.BigEndian.Uint16(r.data[34:])
		if !bytes.Equal(r.data, udpFrame(port, 1000+int(port%1000))) {
			t.Fatalf("record of port %d is not the frame sent", port)
		}
	}
}

// A Writer closed without frames leaves a valid, empty capture; a failing
// file stops recording and Close reports it.
func TestEmptyAndFailing(t *testing.T) {
	out := &bufCloser{}
	w := New(out, Config{})
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if recs := parse(t, out.Bytes()); len(recs) != 0 {
		t.Errorf("%d records in an empty capture", len(recs))
	}
	w.Close() // idempotent

	fw := New(failingFile{}, Config{Name: "broken.pcap"})
	fw.Start()
	a, b := taptest.Pipe(false, 16)
	dev := fw.Wrap(a)
	dev.Write([][]byte{udpFrame(1, 10)})
	b.Read([][]byte{make([]byte, 100)})
	err := fw.Close()
	if !errors.Is(err, errDiskFull) {
		t.Errorf("Close after a failed write: %v", err)
	}
}

var errDiskFull = fmt.Errorf("no space left on device")

type failingFile struct{}

func (failingFile) Write([]byte) (int, error) { return 0, errDiskFull }
func (failingFile) Close() error              { return nil }
