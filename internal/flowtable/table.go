// Package flowtable is gonetns's one table of UDP-like flows and the one
// poller that reads their sockets: nat's UDP flows and ping sessions and
// portfwd's published-port UDP flows keep their flows here, under one
// eviction rule (a full table makes room by closing the idlest flow of a
// sample, of the group holding the most), one idle rule (a flow that has
// carried nothing either way for its timeout is closed; time is passed in,
// as tailscale's natlab does, so expiry is tested without sleeping), and
// one cap on the number of flows (MaxFlows), which the descriptor budget
// takes its caps from.
package flowtable

import (
	"context"
	"sync"
	"time"
)

// MaxFlows is the most flows a table is given, whatever the descriptor
// budget allows: a flow costs a descriptor and about 300 bytes with the
// Poller (nat's UDP flows: 0.86-1.13 GB for 4,096 flows when each had two
// goroutines and two 64 KiB buffers), and 16,384 lets a burst of new
// source ports, a resolver's or a scanner's, get its answers. Beyond it,
// the packet path's eviction and the expiry scan grow, not descriptors.
const MaxFlows = 16384

// Flow is an entry of a table: something with host resources that goes
// idle and can be closed.
type Flow interface {
	// LastActive returns when a datagram last went through the flow.
	LastActive() time.Time
	// Close releases the flow's sockets. The table calls it once, when it
	// drops the flow (evicted, expired, replaced, or all at CloseAll),
	// with its lock held: Close must not call back into the table.
	Close()
}

// Config of a Table.
type Config[K comparable] struct {
	// Max is the most flows the table holds; at least 1.
	Max int
	// Idle is how long a flow of key k may carry nothing before Expire
	// closes it.
	Idle func(k K) time.Duration
	// Group, if set, shares the table among groups of flows (clients: a
	// published port's client address): when the table is full, the flow
	// evicted for a new one is one of the group holding the most flows,
	// so that no group can keep the others out by holding flows, and a
	// group that holds the most recycles its own. Nil: one group.
	Group func(k K) any
	// Wake, if set, is given a token (never blocking) whenever a flow is
	// added to the empty table: the wake of the ExpireEvery that expires
	// the table, which does not tick while its tables are empty.
	Wake chan<- struct{}
}

// Stats is what a table holds and what its limits have done.
type Stats struct {
	// Flows is the number of flows now, Max the cap, Peak the most held
	// at once.
	Flows, Max, Peak int
	// Evicted counts flows closed to make room for a new one; Expired
	// flows closed after carrying nothing for their idle timeout.
	Evicted, Expired uint64
}

// Table holds flows by key. Its methods are safe for concurrent use.
type Table[K comparable, F Flow] struct {
	cfg Config[K]

	mu     sync.Mutex
	flows  map[K]F
	groups map[any]map[K]struct{} // with cfg.Group: the keys of each group
	stats  Stats
}

// New returns an empty table.
func New[K comparable, F Flow](cfg Config[K]) *Table[K, F] {
	cfg.Max = max(cfg.Max, 1)
	t := &Table[K, F]{cfg: cfg, flows: make(map[K]F)}
	t.stats.Max = cfg.Max
	if cfg.Group != nil {
		t.groups = make(map[any]map[K]struct{})
	}
	return t
}

// Get returns the flow of k, if any.
func (t *Table[K, F]) Get(k K) (F, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f, ok := t.flows[k]
	return f, ok
}

// evictSample is how many flows Add compares when the table is full: the
// idlest of a sample, not of the whole table, so that a new flow costs
// about the same at 16,384 flows as at 32. Measured with
// BenchmarkAddFull (16,384 flows, 2 cores): 1.0 µs per new flow with the
// sample, 253 µs with a scan of the whole table, under the table's lock on
// the packet path. Map iteration starts at a random place, and an idle
// flow is rarely alone: a sample of 32 finds one of the idlest with a high
// probability. Groups of up to 32 flows are scanned whole.
const evictSample = 32

// Add inserts f under k, closing a flow k had. When the table is full,
// the idlest of a sample of the flows of the group holding the most (of
// all flows, without groups) is closed and returned, to be logged.
func (t *Table[K, F]) Add(k K, f F) (evicted F, didEvict bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.flows) == 0 && t.cfg.Wake != nil {
		select {
		case t.cfg.Wake <- struct{}{}:
		default: // a token is there already
		}
	}
	if old, ok := t.flows[k]; ok {
		t.deleteLocked(k)
		old.Close()
	}
	if len(t.flows) >= t.cfg.Max {
		victim := t.victimLocked()
		evicted, didEvict = t.flows[victim], true
		t.deleteLocked(victim)
		evicted.Close()
		t.stats.Evicted++
	}
	t.flows[k] = f
	if t.groups != nil {
		g := t.cfg.Group(k)
		if t.groups[g] == nil {
			t.groups[g] = make(map[K]struct{})
		}
		t.groups[g][k] = struct{}{}
	}
	t.stats.Peak = max(t.stats.Peak, len(t.flows))
	return evicted, didEvict
}

// victimLocked picks the flow a full table evicts.
func (t *Table[K, F]) victimLocked() K {
	var victim K
	var oldest time.Time
	seen := 0
	consider := func(k K) bool {
		if la := t.flows[k].LastActive(); seen == 0 || la.Before(oldest) {
			victim, oldest = k, la
		}
		seen++
		return seen < evictSample
	}
	if t.groups == nil {
		for k := range t.flows {
			if !consider(k) {
				break
			}
		}
		return victim
	}
	var biggest map[K]struct{}
	for _, keys := range t.groups {
		if len(keys) > len(biggest) {
			biggest = keys
		}
	}
	for k := range biggest {
		if !consider(k) {
			break
		}
	}
	return victim
}

func (t *Table[K, F]) deleteLocked(k K) {
	delete(t.flows, k)
	if t.groups != nil {
		g := t.cfg.Group(k)
		if keys := t.groups[g]; keys != nil {
			delete(keys, k)
			if len(keys) == 0 {
				delete(t.groups, g)
			}
		}
	}
}

// Remove deletes k if it still maps to f, without closing f (the flow
// ended by itself).
func (t *Table[K, F]) Remove(k K, f F) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if cur, ok := t.flows[k]; ok && any(cur) == any(f) {
		t.deleteLocked(k)
	}
}

// Expire closes and removes the flows that have carried nothing for their
// idle timeout at now, and returns how many.
func (t *Table[K, F]) Expire(now time.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for k, f := range t.flows {
		if now.Sub(f.LastActive()) >= t.cfg.Idle(k) {
			t.deleteLocked(k)
			f.Close()
			n++
		}
	}
	t.stats.Expired += uint64(n)
	return n
}

// Expirable is a table as ExpireEvery sees it.
type Expirable interface {
	Expire(now time.Time) int
	Len() int
}

// ExpireEvery runs Expire(now()) every interval until ctx ends, calling
// expired with the count when flows were closed. While every table is
// empty it does not tick but waits for a token on wake (the tables'
// Config.Wake): a sandbox that sends no UDP costs no wake-up a second.
// A nil wake: it ticks all the time.
func ExpireEvery(ctx context.Context, interval time.Duration, now func() time.Time, expired func(n int), wake <-chan struct{}, tables ...Expirable) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		if wake != nil && allEmpty(tables) {
			tick.Stop()
			select {
			case <-ctx.Done():
				return
			case <-wake:
			}
			tick.Reset(interval)
			continue // the token may be one of before: look again
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		at, n := now(), 0
		for _, t := range tables {
			n += t.Expire(at)
		}
		if n > 0 && expired != nil {
			expired(n)
		}
	}
}

func allEmpty(tables []Expirable) bool {
	for _, t := range tables {
		if t.Len() > 0 {
			return false
		}
	}
	return true
}

// CloseIf closes and removes the flows whose key pred accepts (a
// published port's, when it is removed), and returns how many.
func (t *Table[K, F]) CloseIf(pred func(K) bool) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for k, f := range t.flows {
		if pred(k) {
			t.deleteLocked(k)
			f.Close()
			n++
		}
	}
	return n
}

// CloseAll closes and removes every flow.
func (t *Table[K, F]) CloseAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, f := range t.flows {
		t.deleteLocked(k)
		f.Close()
	}
}

// Len returns the number of flows.
func (t *Table[K, F]) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.flows)
}

// Stats returns the table's figures.
func (t *Table[K, F]) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.stats
	s.Flows = len(t.flows)
	return s
}
