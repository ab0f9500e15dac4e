package tcpfast

import (
	"testing"
	"time"
)

// TestBusyPollWindow: the window grows from nothing while the loop is
// woken soon after it sleeps, never beyond max, shrinks and turns off when
// it sleeps long, and stays off without a max.
func TestBusyPollWindow(t *testing.T) {
	const us = time.Microsecond
	for _, tc := range []struct {
		name  string
		max   time.Duration
		slept []time.Duration
		want  []time.Duration // the window after each sleep
	}{
		{"off", 0, []time.Duration{5 * us, 5 * us}, []time.Duration{0, 0}},
		{"grows to max", 50 * us, []time.Duration{20 * us, 30 * us, 40 * us, 10 * us}, []time.Duration{10 * us, 20 * us, 40 * us, 50 * us}},
		{"a sleep of max itself still grows it", 50 * us, []time.Duration{50 * us}, []time.Duration{10 * us}},
		{"max below the first step", 5 * us, []time.Duration{1 * us, 1 * us}, []time.Duration{5 * us, 5 * us}},
		{"shrinks after long sleeps, then off", 40 * us, []time.Duration{1 * us, 1 * us, 1 * us, time.Second, time.Second, time.Second}, []time.Duration{10 * us, 20 * us, 40 * us, 20 * us, 10 * us, 0}},
		{"off stays off through long sleeps", 40 * us, []time.Duration{time.Second, time.Second}, []time.Duration{0, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := busyPoll{max: tc.max}
			for i, d := range tc.slept {
				b.slept(d)
				if got := b.window(); got != tc.want[i] {
					t.Fatalf("after sleeps %v: window %v, want %v", tc.slept[:i+1], got, tc.want[i])
				}
			}
		})
	}
}
