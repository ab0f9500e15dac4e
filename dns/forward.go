package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
)

// Transports a client query can arrive on; they double as the network
// names for net.Dial.
const (
	udp = "udp"
	tcp = "tcp"
)

// errNoAnswer means no upstream gave a usable answer within the budget.
var errNoAnswer = errors.New("no upstream answered")

// forwarder turns one client query into one answer. It holds no sockets:
// the Server reads queries and writes answers, the exchanger talks to
// upstreams, so handle can be called with plain bytes (the fuzz target
// does).
type forwarder struct {
	ex        exchanger
	upstreams []netip.AddrPort
	timeout   time.Duration
	log       *slog.Logger

	// down is set once every upstream has failed a query and the warning
	// has been logged, so it is logged once per outage, not per query.
	down atomic.Bool
	// answered is when an upstream last answered (Unix nanoseconds; 0:
	// never): a query no upstream answers is an outage only when none
	// has answered anything for outageQuiet.
	answered atomic.Int64
	// refusedSaid is set once an answer REFUSED by every upstream that
	// answered has been passed on and noted in the log (once per run).
	refusedSaid atomic.Bool
}

// handle answers query, which arrived on transport tr (udp or tcp). It
// returns nil when the query must be dropped: shorter than a header, a
// response rather than a query, or ctx cancelled (the server is closing).
//
// The client's bytes go upstream unchanged except for the ID, and the
// upstream's answer comes back unchanged except for the ID, which is set
// back to the client's. A UDP answer bigger than the client can take is
// truncated (see truncate).
func (f *forwarder) handle(ctx context.Context, query []byte, tr string) []byte {
	start := time.Now()
	h, err := parseHeader(query)
	if err != nil {
		return nil
	}
	if h.response() {
		// Answering answers invites loops and reflection.
		return nil
	}
	var q mdns.Msg
	if err := q.Unpack(query); err != nil {
		f.log.LogAttrs(ctx, slog.LevelDebug, "dns query malformed; answering FORMERR",
			slog.String("transport", tr), slog.Any("error", err))
		return formErr(query)
	}
	if len(q.Question) != 1 {
		return f.refuse(ctx, &q, tr, mdns.RcodeFormatError, start)
	}
	if q.Opcode != mdns.OpcodeQuery {
		// NOTIFY, UPDATE and the like are for authoritative servers, not
		// for the host's stub resolver.
		return f.refuse(ctx, &q, tr, mdns.RcodeNotImplemented, start)
	}
	if t := q.Question[0].Qtype; t == mdns.TypeAXFR || t == mdns.TypeIXFR {
		// A zone transfer is a stream of messages; we forward one.
		return f.refuse(ctx, &q, tr, mdns.RcodeRefused, start)
	}

	reply, rh, up, err := f.resolve(ctx, query, q.Question[0], tr)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		resp := errorReply(&q, mdns.RcodeServerFailure)
		f.logQuery(ctx, q.Question[0], tr, netip.AddrPort{}, mdns.RcodeServerFailure, start, false, err)
		return resp
	}
	setID(reply, h.id)
	truncated := false
	if tr == udp {
		if size := clientUDPSize(&q); len(reply) > size {
			t, err := truncate(reply, size)
			if err != nil {
				// reply passed checkReply, so its header parses.
				return errorReply(&q, mdns.RcodeServerFailure)
			}
			reply, truncated = t, true
		}
	}
	f.logQuery(ctx, q.Question[0], tr, up, rh.rcode(), start, truncated, nil)
	return reply
}

// refuse answers q with our own rcode, without asking upstream.
func (f *forwarder) refuse(ctx context.Context, q *mdns.Msg, tr string, rcode int, start time.Time) []byte {
	var qq mdns.Question
	if len(q.Question) > 0 {
		qq = q.Question[0]
	}
	f.logQuery(ctx, qq, tr, netip.AddrPort{}, rcode, start, false, nil)
	return errorReply(q, rcode)
}

func (f *forwarder) logQuery(ctx context.Context, q mdns.Question, tr string, up netip.AddrPort, rcode int, start time.Time, truncated bool, err error) {
	if !f.log.Enabled(ctx, slog.LevelDebug) {
		return
	}
	attrs := []slog.Attr{
		slog.String("name", q.Name),
		slog.String("type", typeString(q.Qtype)),
		slog.String("transport", tr),
		slog.String("rcode", rcodeString(rcode)),
		slog.Duration("duration", time.Since(start)),
	}
	if up.IsValid() {
		attrs = append(attrs, slog.String("upstream", up.String()))
	}
	if truncated {
		attrs = append(attrs, slog.Bool("truncated", true))
	}
	if err != nil {
		attrs = append(attrs, slog.Any("error", err))
	}
	f.log.LogAttrs(ctx, slog.LevelDebug, "dns query", attrs...)
}

// result is the outcome of one try against one upstream.
type result struct {
	upstream netip.AddrPort
	reply    []byte
	hdr      header
	err      error
}

// resolve asks the upstreams in order within one budget of f.timeout.
// Upstream i+1 starts when upstream i has failed (error, SERVFAIL,
// REFUSED) or has been silent for a slice of the budget
// (timeout/len(upstreams)); a slow upstream keeps its chance while the
// next one runs, and the first good answer wins. NXDOMAIN, NODATA and
// every other rcode count as answers.
//
// When no upstream gave a usable answer, the client gets the last
// upstream SERVFAIL as is if there was one (it may carry an extended DNS
// error), else the last REFUSED as is (a resolver that refuses a name, a
// class or a kind of query: the client sees what a program on the host
// sees, not SERVFAIL), else an error from resolve, which the caller turns
// into its own SERVFAIL. Only that last case is an outage (markDown): a
// REFUSED used to count as one, so that each refused name logged a
// warning that every name would fail, and the next answer its end.
func (f *forwarder) resolve(ctx context.Context, query []byte, q mdns.Question, tr string) ([]byte, header, netip.AddrPort, error) {
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	results := make(chan result, len(f.upstreams))
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()

	next, pending := 0, 0
	launch := func() {
		up := f.upstreams[next]
		next++
		pending++
		wg.Add(1)
		go func() {
			defer wg.Done()
			reply, h, err := f.try(ctx, up, query, q, tr)
			results <- result{upstream: up, reply: reply, hdr: h, err: err}
		}()
	}
	slice := f.timeout / time.Duration(len(f.upstreams))
	timer := time.NewTimer(slice)
	defer timer.Stop()
	launch()

	var (
		servfail *result // the last SERVFAIL answer
		refused  *result // the last REFUSED answer
		errs     []error
	)
wait:
	for pending > 0 {
		select {
		case r := <-results:
			pending--
			if r.err == nil {
				switch rc := r.hdr.rcode(); rc {
				case mdns.RcodeServerFailure:
					servfail = &r
				case mdns.RcodeRefused:
					refused = &r
				default:
					f.markUp()
					return r.reply, r.hdr, r.upstream, nil
				}
			} else {
				errs = append(errs, fmt.Errorf("%s: %w", r.upstream, r.err))
			}
			if next < len(f.upstreams) {
				launch()
				timer.Reset(slice)
			}
		case <-timer.C:
			if next < len(f.upstreams) {
				launch()
				timer.Reset(slice)
			}
		case <-ctx.Done():
			break wait
		}
	}
	if servfail != nil {
		f.markUp() // reachable, if unhelpful
		return servfail.reply, servfail.hdr, servfail.upstream, nil
	}
	if refused != nil {
		f.markUp()
		if f.refusedSaid.CompareAndSwap(false, true) {
			f.log.Info("dns: the upstream resolvers refused a query; the sandbox gets their REFUSED as a program on the host would. "+
				"If they refuse every query from this host, choose others with --dns-upstream=IP[:PORT]",
				slog.String("upstream", refused.upstream.String()), slog.String("name", q.Name))
		}
		return refused.reply, refused.hdr, refused.upstream, nil
	}
	if parent.Err() != nil {
		return nil, header{}, netip.AddrPort{}, parent.Err()
	}
	if pending > 0 {
		errs = append(errs, fmt.Errorf("%d upstream(s) silent until the %v budget ran out", pending, f.timeout))
	}
	err := fmt.Errorf("%w: %w", errNoAnswer, errors.Join(errs...))
	f.markDown(q, err)
	return nil, header{}, netip.AddrPort{}, err
}

// try asks one upstream. Over UDP, an answer with TC set is asked again
// over TCP; if that fails, the truncated answer is passed on as is and
// the client can retry over TCP itself.
func (f *forwarder) try(ctx context.Context, up netip.AddrPort, query []byte, q mdns.Question, tr string) ([]byte, header, error) {
	out := append([]byte(nil), query...)
	// A fresh ID per exchange, on top of the fresh source port, so a late
	// or forged datagram does not pass for the answer. math/rand/v2's
	// global source is a ChaCha8 seeded from the OS.
	id := uint16(rand.Uint32())
	setID(out, id)
	reply, err := f.ex.exchange(ctx, tr, up, out)
	if err != nil {
		return nil, header{}, err
	}
	h, err := checkReply(id, q, reply)
	if err != nil {
		return nil, header{}, fmt.Errorf("bad answer: %w", err)
	}
	if tr != udp || !h.truncated() {
		return reply, h, nil
	}
	id = uint16(rand.Uint32())
	setID(out, id)
	full, err := f.ex.exchange(ctx, tcp, up, out)
	if err == nil {
		var fh header
		if fh, err = checkReply(id, q, full); err == nil {
			return full, fh, nil
		}
	}
	f.log.LogAttrs(ctx, slog.LevelDebug, "dns TCP retry after truncated UDP answer failed; passing the truncated answer on",
		slog.String("upstream", up.String()), slog.Any("error", err))
	return reply, h, nil
}

// outageQuiet is how long the upstreams must have answered nothing for a
// query they leave unanswered to count as an outage. A resolver that
// never answers one name (its authoritative servers silent) while it
// answers every other is no outage: each such query warned that every
// name would get SERVFAIL and told the user to change --dns-upstream, and
// the next answer said the resolvers answered again (two lines per
// query, 10 for 5 queries of that name between good ones).
const outageQuiet = 30 * time.Second

// markDown logs, once per outage, that no upstream answers; a query left
// unanswered while the upstreams answer others is said at debug level.
func (f *forwarder) markDown(q mdns.Question, err error) {
	if last := f.answered.Load(); last != 0 && time.Since(time.Unix(0, last)) < outageQuiet {
		f.log.Debug("dns: no upstream resolver answered this name, though they answer others; the sandbox gets SERVFAIL for it",
			slog.String("name", q.Name), slog.Any("error", err))
		return
	}
	if f.down.CompareAndSwap(false, true) {
		ups := make([]string, len(f.upstreams))
		for i, u := range f.upstreams {
			ups[i] = u.String()
		}
		f.log.Warn("dns: no upstream resolver answered; the sandbox gets SERVFAIL for every name until one does. "+
			"Check that these resolvers are reachable from the host, or choose others with --dns-upstream=IP[:PORT]",
			slog.Any("upstreams", ups), slog.Duration("budget", f.timeout), slog.Any("error", err))
	}
}

// markUp notes that an upstream answered, ending an outage.
func (f *forwarder) markUp() {
	f.answered.Store(time.Now().UnixNano())
	if f.down.CompareAndSwap(true, false) {
		f.log.Info("dns: an upstream resolver answers again")
	}
}
