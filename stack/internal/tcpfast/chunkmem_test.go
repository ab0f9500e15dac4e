package tcpfast

import (
	"errors"
	"net/netip"
	"runtime"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/tap/taptest"
)

// TestChunkBuf: a small chunk's buffer is the smallest pooled class that
// holds it, a large one a slot of the arena, one beyond a slot is made to
// measure; each comes back empty, and a buffer given back is reused.
func TestChunkBuf(t *testing.T) {
	for _, tc := range []struct {
		n, wantCap   int
		pooled, slot bool
	}{
		{0, 0, false, false},
		{1, 2048, true, false},
		{1448, 2048, true, false},
		{2048, 2048, true, false},
		{2049, 4096, true, false},
		{4096, 4096, true, false},
		{4097, slotSize, false, true},
		{32769, slotSize, false, true},
		{65536, slotSize, false, true},
		{65537, 65537, false, false},
	} {
		b, h := chunkBuf(tc.n)
		if len(b) != 0 || cap(b) != tc.wantCap || (h.pooled != nil) != tc.pooled || (h.slot > 0) != tc.slot {
			t.Errorf("chunkBuf(%d): len %d cap %d pooled %v slot %v; want 0, %d, %v, %v", tc.n, len(b), cap(b), h.pooled != nil, h.slot > 0, tc.wantCap, tc.pooled, tc.slot)
		}
		b = append(b, make([]byte, tc.n)...) // the whole buffer is writable
		putChunkBuf(h)
		if b2, h2 := chunkBuf(tc.n); cap(b2) != tc.wantCap {
			t.Errorf("chunkBuf(%d) after a buffer was given back: cap %d, want %d", tc.n, cap(b2), tc.wantCap)
		} else {
			putChunkBuf(h2)
		}
	}
}

// TestSlotArena: slots are reused last freed first, a slot's buffer cannot
// grow into its neighbour, every slot can be taken and then get says
// none, and release gives back the pages of free slots only (mincore).
func TestSlotArena(t *testing.T) {
	var a slotArena
	t.Cleanup(func() {
		if a.mem != nil {
			unix.Munmap(a.mem)
		}
	})
	b0, s0, ok := a.get()
	if !ok {
		t.Fatal("the arena could not map its memory: chunks would all come from the heap")
	}
	b1, s1, _ := a.get()
	if s0 != 0 || s1 != 1 || cap(b0) != slotSize {
		t.Fatalf("first slots %d, %d (cap %d); want 0, 1 (cap %d)", s0, s1, cap(b0), slotSize)
	}
	b0 = append(b0, make([]byte, slotSize)...)
	b0 = append(b0, 1) // beyond the slot: a copy on the heap, slot 1 untouched
	if b1[:1][0] != 0 {
		t.Fatal("appending past slot 0 wrote into slot 1")
	}
	b1 = append(b1, 0xaa)
	a.put(s0)
	if _, s, _ := a.get(); s != s0 {
		t.Fatalf("after put(%d), get gave slot %d; want the slot freed last", s0, s)
	}
	a.put(s0)

	// Slot 1 is in use, slot 0 free: release drops slot 0's page only.
	if got := resident(t, a.mem[:slotSize]); got == 0 {
		t.Fatal("slot 0 was written but none of its pages is resident")
	}
	a.release()
	if got := resident(t, a.mem[:slotSize]); got != 0 {
		t.Errorf("after release, free slot 0 keeps %d resident pages", got)
	}
	if got := resident(t, a.mem[slotSize:2*slotSize]); got == 0 || b1[0] != 0xaa {
		t.Errorf("release dropped slot 1, which is in use (resident pages %d, first byte %#x)", got, b1[0])
	}
	if a.touched != 2 {
		t.Errorf("after release with slot 1 in use, touched = %d; want 2", a.touched)
	}
	a.put(s1)
	a.release()
	if got := resident(t, a.mem[:2*slotSize]); got != 0 || a.touched != 0 {
		t.Errorf("after release with every slot free: %d resident pages, touched %d; want 0, 0", got, a.touched)
	}

	var taken int
	for {
		if _, _, ok := a.get(); !ok {
			break
		}
		taken++
	}
	if taken != arenaSlots {
		t.Errorf("took %d slots before get said none; want %d", taken, arenaSlots)
	}
}

// resident counts the pages of b in memory.
func resident(t *testing.T, b []byte) int {
	t.Helper()
	page := unix.Getpagesize()
	vec := make([]byte, (len(b)+page-1)/page)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

// TestReleaseMemory: once the connections of a burst are gone, the
// engine's maps give their room back at the quiet moment (Go's maps keep
// it otherwise), and maps that still hold more than a quarter of their
// most are left as they are, connections and all.
func TestReleaseMemory(t *testing.T) {
	e := idleEngine(t)
	const burst = 10000
	add := func(i int) *conn {
		c := &conn{}
		c.k, c.id = key{netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 2, 100}), uint16(i)), netip.MustParseAddrPort("10.0.2.2:80")}, uint32(i)
		e.mu.Lock()
		e.conns[c.k], e.byID[c.id] = c, c
		e.mostConn = max(e.mostConn, len(e.conns))
		e.mu.Unlock()
		return c
	}
	remove := func(c *conn) {
		e.mu.Lock()
		delete(e.conns, c.k)
		delete(e.byID, c.id)
		e.mu.Unlock()
	}
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}

	all := make([]*conn, burst)
	for i := range all {
		all[i] = add(i)
	}
	kept := all[:burst/2]
	for _, c := range all[burst/2:] {
		remove(c)
	}
	e.ReleaseMemory() // half of the most: kept as they are
	if len(e.conns) != burst/2 || len(e.byID) != burst/2 || e.mostConn != burst {
		t.Fatalf("with half the burst open: %d and %d in the maps, most %d; want %d, %d, %d", len(e.conns), len(e.byID), e.mostConn, burst/2, burst/2, burst)
	}
	for _, c := range kept[1:] {
		remove(c)
	}
	before := heap()
	e.ReleaseMemory()
	after := heap()
	if len(e.conns) != 1 || e.conns[kept[0].k] != kept[0] || e.byID[kept[0].id] != kept[0] || e.mostConn != 1 {
		t.Fatalf("after the release the maps hold %d (most %d); want the one open connection", len(e.conns), e.mostConn)
	}
	if freed := int64(before) - int64(after); freed < 256<<10 {
		t.Errorf("the release freed %d KiB of the maps' room after %d connections; want at least 256", freed>>10, burst)
	} else {
		t.Logf("the maps' room after %d connections: %d KiB, given back", burst, freed>>10)
	}
}

// TestQueuedBoundCountsMemory: the bound on what connections hold counts
// the memory of their chunks, not their bytes: one-byte segments out of
// order cost a 2 KiB buffer each, a 4,097-byte one a 64 KiB slot, and
// the 1,025th slot-sized chunk is past the bound and dropped.
func TestQueuedBoundCountsMemory(t *testing.T) {
	e := idleEngine(t)
	c := &conn{e: e}
	one := [2][]byte{{'x'}}
	for i := range 100 {
		c.store(uint32(2*i+1), one, 1, false) // every other byte: all out of order
	}
	if got, want := e.queued.Load(), int64(100*2048); got != want {
		t.Errorf("100 one-byte chunks count %d bytes against the bound; want %d (their buffers)", got, want)
	}
	for len(c.queue) > 0 {
		c.dropChunk()
	}
	if q := e.queued.Load(); q != 0 {
		t.Fatalf("with every chunk dropped the bound still counts %d bytes", q)
	}

	big := [2][]byte{make([]byte, 4097)}
	seq := uint32(1)
	for range maxQueued / slotSize {
		c.store(seq, big, 4097, false)
		seq += 5000
	}
	if len(c.queue) != maxQueued/slotSize || e.dropped.Load() != 0 {
		t.Fatalf("%d chunks of 4,097 bytes held, %d dropped; want %d, 0", len(c.queue), e.dropped.Load(), maxQueued/slotSize)
	}
	c.store(seq, big, 4097, false)
	if len(c.queue) != maxQueued/slotSize || e.dropped.Load() != 1 {
		t.Errorf("past the bound: %d chunks held, %d dropped; want %d, 1", len(c.queue), e.dropped.Load(), maxQueued/slotSize)
	}
	for len(c.queue) > 0 {
		c.dropChunk()
	}
	if q := e.queued.Load(); q != 0 {
		t.Errorf("with every chunk dropped the bound still counts %d bytes", q)
	}
}

// idleEngine is an engine that is never started nor dialled: for tests of
// its bookkeeping.
func idleEngine(t *testing.T) *Engine {
	t.Helper()
	dev, _ := taptest.Pipe(true, 16)
	e, err := New(Config{Device: dev, MTU: 1500, MAC: fuzzEngineMAC, Dial: func(src, dst netip.AddrPort) (Host, error) {
		return Host{}, errors.New("not dialled in this test")
	}})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// TestStoreBackwards: a sandbox that sends its segments backwards fills
// the queue up to maxInserted chunks, then only appends and the segment
// at rcvNxt are kept; the queue stays in order of sequence, and a resend
// of a segment held is not held twice.
func TestStoreBackwards(t *testing.T) {
	e := idleEngine(t)
	c := &conn{e: e}
	one := [2][]byte{{'x'}}
	const sent = 10000
	for seq := uint32(sent); seq >= 1; seq-- {
		c.store(seq, one, 1, false)
	}
	if len(c.queue) != maxInserted || e.dropped.Load() != sent-maxInserted {
		t.Fatalf("%d chunks held, %d dropped; want %d, %d", len(c.queue), e.dropped.Load(), maxInserted, sent-maxInserted)
	}
	if first := c.queue[0].seq; first != sent-maxInserted+1 {
		t.Errorf("the first chunk held starts at %d; want %d", first, sent-maxInserted+1)
	}
	c.store(0, one, 1, false)                // fills the hole at rcvNxt: kept past the bound
	c.store(2*sent, one, 1, false)           // an append: kept
	c.store(sent-1, one, 1, false)           // a resend of a chunk held
	c.store(sent-maxInserted, one, 1, false) // inserted before the tail past the bound
	if len(c.queue) != maxInserted+2 || e.dropped.Load() != sent-maxInserted+1 {
		t.Errorf("%d chunks held, %d dropped; want %d, %d", len(c.queue), e.dropped.Load(), maxInserted+2, sent-maxInserted+1)
	}
	if c.queue[0].seq != 0 || c.queue[len(c.queue)-1].seq != 2*sent {
		t.Errorf("the queue runs from %d to %d; want 0 to %d", c.queue[0].seq, c.queue[len(c.queue)-1].seq, 2*sent)
	}
	for i := 1; i < len(c.queue); i++ {
		if !seqLT(c.queue[i-1].seq, c.queue[i].seq) {
			t.Fatalf("chunk %d starts at %d, after chunk %d's %d", i, c.queue[i].seq, i-1, c.queue[i-1].seq)
		}
	}
	for len(c.queue) > 0 {
		c.dropChunk()
	}
	if q := e.queued.Load(); q != 0 {
		t.Errorf("with every chunk dropped the bound still counts %d bytes", q)
	}
}
