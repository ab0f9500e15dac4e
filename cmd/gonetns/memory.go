package main

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Memory left over from a burst goes back to the system once the network
// is quiet. Go collects garbage only when the program allocates, and
// otherwise every two minutes; its scavenger then hands free pages back
// slowly. After a burst of 10,000 connections the parent stayed at 294
// MiB for two minutes, then 180 MiB (idle before: 11 MiB).
//
// So every memoryCheckEvery the parent looks at the heap. While
// collections run by themselves the program is busy and nothing is done.
// When none ran since the last look and the heap holds at least
// memorySlack bytes (objects, or free pages kept), it collects and returns
// what is free (debug.FreeOSMemory): the objects of connections closed
// since the last collection are garbage that only a collection can tell.
// A collection that frees little (a large live heap: many connections
// still open) doubles the wait before the next one, up to
// memoryMaxBackoff looks, so an idle sandbox holding many connections
// is not collected over and over.
const (
	memoryCheckEvery = 5 * time.Second
	memorySlack      = 16 << 20
	memoryMaxBackoff = 24 // 2 minutes, the runtime's own forced period
)

// heapSample is what one look at the heap reads.
type heapSample struct {
	gcCycles uint64 // completed collections
	objects  uint64 // bytes of heap objects, live or not yet known to be garbage
	free     uint64 // bytes of free heap the runtime keeps (not returned)
}

// memoryPolicy is the state between looks.
type memoryPolicy struct {
	prev    heapSample
	skip    int // looks to let pass before collecting again
	backoff int // the next skip after a collection that freed little
}

// look decides from a new sample whether to collect and return memory
// now.
func (p *memoryPolicy) look(cur heapSample) bool {
	busy := cur.gcCycles != p.prev.gcCycles
	p.prev = cur
	if busy {
		p.skip, p.backoff = 0, 0
		return false
	}
	if p.skip > 0 {
		p.skip--
		return false
	}
	return cur.objects >= memorySlack || cur.free >= memorySlack
}

// collected records the outcome of a collection made on look's advice.
func (p *memoryPolicy) collected(before, after heapSample) {
	p.prev = after
	if before.objects-min(before.objects, after.objects) >= memorySlack {
		p.backoff = 0 // it was worth it: look again at the usual pace
		return
	}
	p.backoff = min(max(2*p.backoff, 1), memoryMaxBackoff)
	p.skip = p.backoff
}

var heapMetrics = []metrics.Sample{
	{Name: "/gc/cycles/total:gc-cycles"},
	{Name: "/memory/classes/heap/objects:bytes"},
	{Name: "/memory/classes/heap/free:bytes"},
}

func readHeap() heapSample {
	metrics.Read(heapMetrics)
	v := func(i int) uint64 {
		if heapMetrics[i].Value.Kind() != metrics.KindUint64 {
			return 0
		}
		return heapMetrics[i].Value.Uint64()
	}
	return heapSample{gcCycles: v(0), objects: v(1), free: v(2)}
}

// returnMemory runs until ctx ends.
func returnMemory(ctx context.Context) {
	t := time.NewTicker(memoryCheckEvery)
	defer t.Stop()
	p := memoryPolicy{prev: readHeap()}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if cur := readHeap(); p.look(cur) {
			debug.FreeOSMemory()
			p.collected(cur, readHeap())
		}
	}
}
