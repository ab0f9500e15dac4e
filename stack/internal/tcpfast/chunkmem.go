package tcpfast

import (
	"math/bits"
	"sync"

	"golang.org/x/sys/unix"
)

// Chunks keep the sandbox's bytes that the host socket has not taken yet
// (conn.store). During an upload to a server that reads slower than the
// sandbox sends, the socket takes part of nearly every segment and the
// rest, tens of KiB, waits in a chunk: those were 323 MB of garbage in 70
// s of the soak and 2-3 collections a second when each chunk was made
// afresh. Large chunks therefore live outside Go's heap, in the slots of
// one mapping (slotArena); small ones in pooled heap buffers.
//
// Why outside the heap: pooled heap buffers (sync.Pool, which a
// collection empties) kept the heap under upload traffic at twice what
// the chunks held, and each new high of that heap left runtime metadata
// behind (the span records, which Go never returns): in a 10-minute soak
// (scripts/soak.sh) the network process's private memory at its quiet
// points rose 3.30 to 3.36 MiB after the first minute, all of it in the
// runtime's off-heap mapping and each step at a new high of the heap
// under traffic (/proc/PID/smaps sampled each second). Live heap under
// that traffic was 1.6-2.0 MiB, 1.1-1.4 of it chunk buffers (heap
// profiles every 2 s).

// smallChunk is the largest chunk kept in a pooled heap buffer; larger
// ones take a slot. Below it a slot would cost a whole page of resident
// memory for a few bytes, and the arena's slots are counted.
const smallChunk = 4 << 10

// chunkBufs pool the heap buffers of small chunks, by size: 2 KiB
// (chunkClass0) and 4 KiB.
var chunkBufs [2]sync.Pool

const chunkClass0 = 11 // 2 KiB

// smallClass is the pool of chunkBufs whose buffers fit a small chunk of
// n bytes (0 < n <= smallChunk) with the least room to spare.
func smallClass(n int) int { return max(bits.Len(uint(n-1))-chunkClass0, 0) }

// chunkMem is the arena of all engines' large chunks.
var chunkMem slotArena

// The arena's slots hold the largest segment the sandbox sends (a 64 KiB
// GSO frame's payload); arenaSlots of them make maxQueued, the bytes one
// engine may hold. When they are all taken (several engines in one
// process), a chunk's buffer comes from the heap.
const (
	slotSize   = 64 << 10
	arenaSlots = maxQueued / slotSize
)

// chunkBuf returns an empty buffer for a chunk of n bytes and the handle
// that gives it back to putChunkBuf.
func chunkBuf(n int) ([]byte, chunkHandle) {
	switch {
	case n == 0:
		return nil, chunkHandle{} // a FIN alone
	case n <= smallChunk:
		class := smallClass(n)
		p, _ := chunkBufs[class].Get().(*[]byte)
		if p == nil {
			b := make([]byte, 1<<(chunkClass0+class))
			p = &b
		}
		return (*p)[:0], chunkHandle{pooled: p}
	case n <= slotSize:
		if b, slot, ok := chunkMem.get(); ok {
			return b, chunkHandle{slot: slot + 1}
		}
	}
	return make([]byte, 0, n), chunkHandle{}
}

// chunkCost is the memory a chunk of n bytes takes, which maxQueued
// bounds: its buffer's size (a slot's for one that could come from the
// heap when the slots are taken). Counting the bytes alone, a sandbox
// sending one byte per segment out of order held 2 KiB of the network
// process's memory for each byte the bound counted.
func chunkCost(n int) int64 {
	switch {
	case n == 0:
		return 0
	case n <= smallChunk:
		return 1 << (chunkClass0 + smallClass(n))
	case n <= slotSize:
		return slotSize
	}
	return int64(n)
}

// chunkHandle says where a chunk's buffer goes back to: a small pool, a
// slot of the arena (slot is its index plus one), or nowhere (the heap's
// collector takes it).
type chunkHandle struct {
	pooled *[]byte
	slot   int32
}

// putChunkBuf gives a chunk's buffer back. The chunk's data must not be
// used after it.
func putChunkBuf(h chunkHandle) {
	switch {
	case h.pooled != nil:
		chunkBufs[smallClass(cap(*h.pooled))].Put(h.pooled)
	case h.slot > 0:
		chunkMem.put(h.slot - 1)
	}
}

// ReleaseMemory gives back what the traffic left behind, for a caller
// that knows the network is quiet: the pages of the chunk arena's free
// slots (a slot used again takes its pages afresh, a page fault each),
// the spare conns, and the room of the connection maps when they hold a
// quarter or less of the most they held since the last call. Go's maps
// never shrink: after a burst of connections they kept its room for good
// (1.5 MiB after 10,000 connections, TestReleaseMemory), and at a soak's
// quiet points that room was whatever the busiest moment so far had made
// it.
func (e *Engine) ReleaseMemory() {
	e.mu.Lock()
	if n := len(e.conns); e.mostConn > 0 && n <= e.mostConn/4 {
		conns, byID := make(map[key]*conn, n), make(map[uint32]*conn, n)
		for k, c := range e.conns {
			conns[k], byID[c.id] = c, c
		}
		e.conns, e.byID, e.mostConn = conns, byID, n
	}
	e.spare = nil
	e.mu.Unlock()
	chunkMem.release()
}

// slotArena hands out fixed slots of one private anonymous mapping, made
// on first use and kept for the life of the process (a slice of it may
// outlive an engine's Close in a caller's hands; unmapped, that would be
// a crash rather than a stale read). Free slots are reused last-freed
// first, so the pages touched stay those of the busiest moment; release
// returns the free ones' pages.
type slotArena struct {
	mu     sync.Mutex
	mapped bool   // tried to map; mem is nil if that failed
	mem    []byte // arenaSlots * slotSize
	free   []int32
	// touched bounds the slots handed out since the last release: only
	// slots below it can hold pages.
	touched int32
}

// get takes a free slot: an empty buffer of slotSize capacity over it,
// and its index; false when there is none (or no mapping).
func (a *slotArena) get() ([]byte, int32, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.mapped {
		a.mapped = true
		a.mem = mapArena()
		if a.mem != nil {
			a.free = make([]int32, arenaSlots)
			for i := range a.free {
				a.free[i] = int32(arenaSlots - 1 - i) // slot 0 on top
			}
		}
	}
	if len(a.free) == 0 {
		return nil, 0, false
	}
	s := a.free[len(a.free)-1]
	a.free = a.free[:len(a.free)-1]
	a.touched = max(a.touched, s+1)
	off := int(s) * slotSize
	return a.mem[off:off:(off + slotSize)], s, true
}

func (a *slotArena) put(s int32) {
	a.mu.Lock()
	a.free = append(a.free, s)
	a.mu.Unlock()
}

// release drops the pages of the free slots below touched (MADV_DONTNEED:
// a slot's next use reads zeroes, as from a new mapping).
func (a *slotArena) release() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.touched == 0 {
		return
	}
	isFree := make([]bool, a.touched)
	for _, s := range a.free {
		if s < a.touched {
			isFree[s] = true
		}
	}
	var inUse int32
	for s := int32(0); s < a.touched; {
		if !isFree[s] {
			s++
			inUse = s
			continue
		}
		run := s
		for s < a.touched && isFree[s] {
			s++
		}
		// Only an address outside the mapping fails; the pages would stay,
		// which costs memory, not correctness.
		_ = unix.Madvise(a.mem[int(run)*slotSize:int(s)*slotSize], unix.MADV_DONTNEED)
	}
	a.touched = inUse
}

// mapArena maps the arena's address space: reserved, not committed
// (MAP_NORESERVE), without huge pages, so that a slot costs the pages its
// bytes touch and release can return them one by one. nil if the
// mapping cannot be made; chunks then come from the heap.
func mapArena() []byte {
	mem, err := unix.Mmap(-1, 0, arenaSlots*slotSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil
	}
	_ = unix.Madvise(mem, unix.MADV_NOHUGEPAGE) // a hint: without it a slot may cost 2 MiB
	return mem
}
