package main

import (
	"runtime"
	"testing"
)

func TestMemoryPolicy(t *testing.T) {
	const mb = 1 << 20
	var p memoryPolicy
	p.prev = heapSample{gcCycles: 1}
	steps := []struct {
		name    string
		cur     heapSample
		want    bool
		after   *heapSample // the heap after the collection, when one is made
		skipped int         // looks that must then pass without a collection
	}{
		{"busy: collections run by themselves", heapSample{gcCycles: 5, objects: 300 * mb}, false, nil, 0},
		{"quiet after a burst: collect", heapSample{gcCycles: 5, objects: 300 * mb}, true, &heapSample{gcCycles: 6, objects: 10 * mb}, 0},
		{"quiet and small: nothing to do", heapSample{gcCycles: 6, objects: 10 * mb, free: 2 * mb}, false, nil, 0},
		{"quiet, free pages kept", heapSample{gcCycles: 6, objects: 10 * mb, free: 100 * mb}, true, &heapSample{gcCycles: 7, objects: 10 * mb}, 1},
		{"large live heap: collected, freed little", heapSample{gcCycles: 7, objects: 250 * mb}, true, &heapSample{gcCycles: 8, objects: 249 * mb}, 2},
		{"again: the wait doubles", heapSample{gcCycles: 8, objects: 250 * mb}, true, &heapSample{gcCycles: 9, objects: 249 * mb}, 4},
		{"traffic again: back to the usual pace", heapSample{gcCycles: 12, objects: 260 * mb}, false, nil, 0},
		{"quiet", heapSample{gcCycles: 12, objects: 260 * mb}, true, nil, 0},
	}
	for _, s := range steps {
		if got := p.look(s.cur); got != s.want {
			t.Fatalf("%s: look = %v, want %v", s.name, got, s.want)
		}
		if s.after != nil {
			p.collected(s.cur, *s.after)
			for i := range s.skipped {
				if p.look(*s.after) {
					t.Fatalf("%s: collected again at look %d of the %d to skip", s.name, i+1, s.skipped)
				}
			}
		}
	}
	for range 10 {
		p.collected(heapSample{objects: 250 * mb}, heapSample{objects: 250 * mb})
	}
	if p.skip != memoryMaxBackoff {
		t.Errorf("wait grew to %d looks, want at most %d", p.skip, memoryMaxBackoff)
	}
	runtime.GC()
	if s := readHeap(); s.objects == 0 || s.gcCycles == 0 {
		t.Errorf("heap metrics read as %+v", s)
	}
}
