package dns

import (
	"context"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

func packed(t testing.TB, m *mdns.Msg) []byte {
	t.Helper()
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestQuestionKey(t *testing.T) {
	a := packed(t, query("a.example.", mdns.TypeA))
	upper := packed(t, query("A.Example.", mdns.TypeA))
	aaaa := packed(t, query("a.example.", mdns.TypeAAAA))
	withEDNS := query("a.example.", mdns.TypeA)
	withEDNS.SetEdns0(4096, true)
	two := query("a.example.", mdns.TypeA)
	two.Question = append(two.Question, two.Question[0])
	root := packed(t, query(".", mdns.TypeNS))
	pointer := append(append([]byte(nil), a[:headerLen]...), 0xC0, 0x0C, 0, 1, 0, 1)
	for _, tc := range []struct {
		name string
		msg  []byte
		want string // "" or the key of the message named
	}{
		{"a.example. A", a, string(a[headerLen:])},
		{"case folded", upper, string(a[headerLen:])},
		{"EDNS left out", packed(t, withEDNS), string(a[headerLen:])},
		{"another type", aaaa, string(aaaa[headerLen:])},
		{"type 65 (HTTPS) not folded", packed(t, query("a.example.", 65)), string(packed(t, query("a.example.", 65))[headerLen:])},
		{"the root", root, string(root[headerLen:])},
		{"two questions", packed(t, two), ""},
		{"a compressed name", pointer, ""},
		{"cut in the name", a[:headerLen+3], ""},
		{"cut in the type", a[:len(a)-1], ""},
		{"header only", a[:headerLen], ""},
		{"short", a[:5], ""},
	} {
		if got := questionKey(tc.msg); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// FuzzQuestionKey: questionKey never panics, never reads past msg, and
// gives a question's name in any case the key of its lower-case form.
func FuzzQuestionKey(f *testing.F) {
	f.Add(packed(f, query("a.example.", mdns.TypeA)))
	f.Add(packed(f, query("A.EXAMPLE.", 65)))
	f.Add([]byte{0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x3f})
	f.Fuzz(func(t *testing.T, msg []byte) {
		k := questionKey(msg)
		if k == "" {
			return
		}
		if len(k) > len(msg)-headerLen {
			t.Fatalf("key of %d bytes from a message of %d", len(k), len(msg))
		}
		lower := append([]byte(nil), msg...)
		for i := headerLen; lower[i] != 0; i += 1 + int(lower[i]) {
			for j := i + 1; j <= i+int(lower[i]); j++ {
				if 'A' <= lower[j] && lower[j] <= 'Z' {
					lower[j] += 'a' - 'A'
				}
			}
		}
		if questionKey(lower) != k {
			t.Fatalf("%x and its lower-case name %x: keys differ", msg, lower)
		}
	})
}

func TestSlotsRules(t *testing.T) {
	s := newSlots(3, 50*time.Millisecond)
	ctx := context.Background()
	var held []*slot
	for _, q := range []string{"q", "r", ""} {
		sl, _, ok := s.take(ctx, q)
		if !ok {
			t.Fatalf("take %q with slots free: refused", q)
		}
		held = append(held, sl)
	}
	if _, _, ok := s.take(ctx, "z"); ok {
		t.Fatal("a fourth slot, the others young: given")
	}
	time.Sleep(60 * time.Millisecond)
	_, qctx, ok := s.take(ctx, "z")
	if !ok {
		t.Fatal("a fourth slot, the oldest past jostleAfter: refused")
	}
	if n, jostled := s.stats(); n != 3 || jostled != 1 {
		t.Errorf("in flight %d, jostled %d; want 3 and 1", n, jostled)
	}
	held[0].release() // jostled already: frees nothing more
	if n, _ := s.stats(); n != 3 {
		t.Errorf("releasing a jostled slot: %d in flight, want 3", n)
	}
	held[1].release()
	if n, _ := s.stats(); n != 2 || qctx.Err() != nil {
		t.Errorf("after a release: %d in flight (want 2), the new query's context %v", n, qctx.Err())
	}

	one := newSlots(100, time.Hour)
	for i := range maxQuestionInFlight {
		if _, _, ok := one.take(ctx, "q"); !ok {
			t.Fatalf("query %d of one question refused", i+1)
		}
	}
	if _, _, ok := one.take(ctx, "q"); ok {
		t.Error("one question past maxQuestionInFlight: given a slot")
	}
	if _, _, ok := one.take(ctx, "other"); !ok {
		t.Error("another question refused")
	}
}
