package dns

import (
	"container/list"
	"context"
	"sync"
	"time"
)

// slots bounds the queries being forwarded at once (maxInFlight, UDP and
// TCP together), so that queries no upstream answers cannot hold every
// slot for their whole budget while names that answer in milliseconds
// wait. Before, a program asking for one name no upstream answered, 300
// times a second, left every other name in the sandbox unanswered while
// it did (`getent hosts` of a name that answers: 10 s, glibc's third
// try). Two rules:
//   - one question (name, type and class) holds at most
//     maxQuestionInFlight slots: asking again what the upstream has not
//     answered yet adds nothing but load;
//   - when every slot is taken, a new query takes the slot of the oldest
//     one if that one has waited longer than jostleAfter (unbound's
//     jostle-timeout is the same idea).
//
// A query refused a slot, or whose slot was taken, is given up: its
// client hears nothing and asks again, as after a lost datagram.
type slots struct {
	max         int
	jostleAfter time.Duration

	mu      sync.Mutex
	order   list.List      // the slots in flight (*slot), oldest first
	perQ    map[string]int // slots held per question
	jostled uint64
	freed   chan struct{} // a token when a slot frees, for a waiting TCP reader
}

// maxQuestionInFlight is how many queries for one question may be
// forwarded at once: clients asking the same name at the same moment
// (a few resolvers' retries, several programs starting together) go
// through; a loop asking a silent name takes no more of the 256.
const maxQuestionInFlight = 8

// slot is one query in flight.
type slot struct {
	question string
	start    time.Time
	cancel   context.CancelFunc
	elem     *list.Element // in slots.order; nil once released or jostled
	s        *slots
}

func newSlots(max int, jostleAfter time.Duration) *slots {
	return &slots{max: max, jostleAfter: jostleAfter, perQ: make(map[string]int), freed: make(chan struct{}, 1)}
}

// take returns a slot for a query of question (questionKey; "" counts
// for no question) and the context the query runs under (cancelled when
// the slot is jostled or released), or false when question holds
// maxQuestionInFlight slots already or every slot is taken by queries
// younger than jostleAfter.
func (s *slots) take(parent context.Context, question string) (*slot, context.Context, bool) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if question != "" && s.perQ[question] >= maxQuestionInFlight {
		return nil, nil, false
	}
	if s.order.Len() >= s.max {
		front := s.order.Front()
		if front == nil {
			return nil, nil, false
		}
		old := front.Value.(*slot)
		if now.Sub(old.start) < s.jostleAfter {
			return nil, nil, false
		}
		s.unlink(old)
		old.cancel()
		s.jostled++
	}
	ctx, cancel := context.WithCancel(parent)
	sl := &slot{question: question, start: now, cancel: cancel, s: s}
	sl.elem = s.order.PushBack(sl)
	if question != "" {
		s.perQ[question]++
	}
	return sl, ctx, true
}

// unlink takes sl out of the list; s.mu is held.
func (s *slots) unlink(sl *slot) {
	s.order.Remove(sl.elem)
	sl.elem = nil
	if sl.question != "" {
		if s.perQ[sl.question]--; s.perQ[sl.question] == 0 {
			delete(s.perQ, sl.question)
		}
	}
}

// release frees sl's slot, unless it was jostled (its slot went then).
func (sl *slot) release() {
	s := sl.s
	s.mu.Lock()
	if sl.elem != nil {
		s.unlink(sl)
	}
	s.mu.Unlock()
	sl.cancel()
	select {
	case s.freed <- struct{}{}:
	default:
	}
}

// wait takes a slot for a TCP query, waiting while every slot is taken
// by young queries; false when ctx ends first.
func (s *slots) wait(ctx context.Context, question string) (*slot, context.Context, bool) {
	t := time.NewTimer(s.jostleAfter)
	defer t.Stop()
	for {
		if sl, qctx, ok := s.take(ctx, question); ok {
			return sl, qctx, true
		}
		t.Reset(s.jostleAfter)
		select {
		case <-s.freed:
		case <-t.C: // the oldest may be old enough to jostle by now
		case <-ctx.Done():
			return nil, nil, false
		}
	}
}

// stats returns the queries in flight and how many were jostled.
func (s *slots) stats() (inFlight int, jostled uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.order.Len(), s.jostled
}

// questionKey is msg's question (its one name, folded to lower case, its
// type and class) as a key for slots, or "" when msg's question cannot be
// read that simply (no question, a compressed or cut-short name: handle
// answers those without asking upstream).
func questionKey(msg []byte) string {
	if len(msg) < headerLen || msg[4] != 0 || msg[5] != 1 {
		return ""
	}
	k := []byte(nil)
	i := headerLen
	for {
		if i >= len(msg) {
			return ""
		}
		l := int(msg[i])
		if l&0xC0 != 0 || i+1+l > len(msg) {
			return ""
		}
		if k == nil {
			k = make([]byte, 0, 64)
		}
		k = append(k, msg[i])
		for _, c := range msg[i+1 : i+1+l] {
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			k = append(k, c)
		}
		i += 1 + l
		if l == 0 {
			break
		}
	}
	if i+4 > len(msg) {
		return ""
	}
	return string(append(k, msg[i:i+4]...))
}
