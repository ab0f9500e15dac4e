package main

import (
	"testing"
	"time"
)

// TestSeriesLastRise: the series remembers when private memory last rose
// above every sample before it, and how many samples have come since.
func TestSeriesLastRise(t *testing.T) {
	for _, tc := range []struct {
		name      string
		anonKB    []int64 // one sample every 30 s from 30 s
		wantAt    time.Duration
		wantHigh  int64
		wantSince int
	}{
		{"flat", []int64{3000, 3000, 3000}, 30 * time.Second, 3000, 2},
		{"steps, then flat", []int64{3000, 3010, 3005, 3020, 3020, 3020}, 2 * time.Minute, 3020, 2},
		{"rising to the end", []int64{3000, 3010, 3020}, 90 * time.Second, 3020, 0},
		{"a dip is not a rise", []int64{3010, 2990, 3000}, 30 * time.Second, 3010, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &series{window: 5 * time.Minute, duration: 30 * time.Minute}
			for i, kb := range tc.anonKB {
				el := time.Duration(i+1) * 30 * time.Second
				s.add(usageSample{anonKB: kb}, el, el <= time.Minute)
			}
			if s.highAt != tc.wantAt || s.high != tc.wantHigh || s.samplesSince != tc.wantSince {
				t.Errorf("last rise at %v to %d KiB, %d samples since; want %v, %d, %d", s.highAt, s.high, s.samplesSince, tc.wantAt, tc.wantHigh, tc.wantSince)
			}
		})
	}
}
