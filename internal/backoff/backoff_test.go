package backoff

import (
	"testing"
	"time"
)

func TestDoublesWithinBounds(t *testing.T) {
	b := Backoff{Min: time.Millisecond, Max: 4 * time.Millisecond}
	var got []time.Duration
	for range 5 {
		b.Wait(nil)
		got = append(got, b.Current())
	}
	want := []time.Duration{1, 2, 4, 4, 4}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("intervals %v, want %v ms", got, want)
		}
	}
	b.Reset()
	b.Wait(nil)
	if b.Current() != time.Millisecond {
		t.Errorf("after Reset: %v", b.Current())
	}
}

func TestDoneEndsWait(t *testing.T) {
	done := make(chan struct{})
	close(done)
	b := Backoff{Min: time.Hour, Max: time.Hour}
	if b.Wait(done) {
		t.Error("Wait returned true with done closed")
	}
}
