package implicit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"syscall"
	"time"

	"github.com/gonetns/gonetns/internal/wire"
)

// The listener protocol of the implicit port driver, on a socket pair of
// its own (the dial protocol stays as it is): the child, which sees the
// namespace, reports what listens there; the parent, which owns the host
// side, decides what to publish (Driver). Child -> parent only:
//
//	listenerSnapshot{listeners, more}
//
// Each snapshot is the whole set of listeners, in parts of at most
// snapshotPart when it is large (more is set on all parts but the last);
// the parent applies a set once its last part is in. Whole sets rather
// than changes: a lost or malformed message then costs one update, not a
// port published forever. The parent sends nothing; its end closing ends
// the watcher.
type listenerSnapshot struct {
	Listeners []Listener `json:"listeners"`
	More      bool       `json:"more,omitempty"`
}

// snapshotPart keeps a message well under wire.MaxMessage: a listener is
// at most ~80 bytes of JSON.
const snapshotPart = 512

// Timing of the watcher, from measurements on this project's 2-core VM
// (utime+stime of both gonetns processes over 60 s idle, side by side).
// There, a wake-up of an idle process costs
// ~250-300 µs of CPU whatever it does (a bare nanosleep loop measured
// 211 µs a wake), a probe of the counters ~7 µs, and a sock_diag scan
// 0.1 ms when the kernel's tables are in cache but 1-2.5 ms when they are
// not, as they are after a second of idling: most of it is the walk of
// the UDP hash table (16384 slots, shared by all namespaces) for each
// family. So the watcher saves wake-ups and scans: it probes every 100 ms
// while anything moves in the namespace (counters or listeners), backing
// off, doubling, to every 500 ms when nothing does, and scans when the
// counters move and once a second anyway, so that the worst case (a
// listener that closes while another socket opens between two probes,
// leaving the counts as they were) is pasta's 1 s. Idle that is 2 wake-ups
// and 1 scan a second: 0.20-0.29% of a core for the whole sandbox,
// against 0.36-0.44% scanning at every wake-up, 0.82-2.4% for pasta -t
// auto -u auto and 0.016-0.034% for --port-driver=builtin.
const (
	// fastInterval is the wait after a change: about how long a
	// listener waits to be published or withdrawn while the namespace
	// is busy (60-230 ms measured end to end).
	fastInterval = 100 * time.Millisecond
	// idleInterval is the longest wait, after a quiet spell: how long
	// the first listener after it waits at most (median 250-280 ms).
	idleInterval = 500 * time.Millisecond
	// scanInterval is how often the sockets are scanned even when the
	// counters have not moved (a listener that closed while another
	// opened between two probes leaves the counts as they were).
	scanInterval = time.Second
)

// WatchConfig configures a Watcher.
type WatchConfig struct {
	// InNetNS runs fn where sockets and procfs files belong to the
	// sandbox's network namespace, as portfwd.ChildConfig.InNetNS; nil means
	// here.
	InNetNS func(fn func() error) error
	// Logger may be nil.
	Logger *slog.Logger
}

// Watcher runs in the child and tells the parent which sockets
// listen in the namespace (TCP in LISTEN, unconnected bound UDP; IPv4 and
// IPv6), for the implicit port driver. It scans over NETLINK_SOCK_DIAG,
// filtered by state in the kernel, when the namespace's socket counters
// move and once a second anyway; it reads the counters every 100 ms to
// 500 ms, the more often the more moves.
type Watcher struct {
	log   *slog.Logger
	diag  *sockDiag
	probe *sockstatProbe // nil: the counters could not be opened; scan at every tick
	// now and after are the clock and the timer of Run's loop (tests
	// drive them).
	now   func() time.Time
	after func(time.Duration) <-chan time.Time
}

// NewWatcher opens the netlink socket and the counters in the
// namespace, and scans once to check that the kernel answers. It starts
// nothing. Create it before the command starts: a /proc mounted later for
// a new PID namespace hides this process's /proc/thread-self.
func NewWatcher(cfg WatchConfig) (*Watcher, error) {
	log := cfg.Logger
	if log == nil {
		log = discardLogger
	}
	inNS := cfg.InNetNS
	if inNS == nil {
		inNS = func(fn func() error) error { return fn() }
	}
	diag, err := openSockDiag(inNS)
	if err != nil {
		return nil, fmt.Errorf("implicit port driver: %w", err)
	}
	if _, err := diag.Listeners(nil); err != nil {
		diag.Close()
		return nil, fmt.Errorf("implicit port driver: the kernel does not list sockets over sock_diag (needs CONFIG_INET_DIAG, INET_TCP_DIAG and INET_UDP_DIAG, or their modules tcp_diag and udp_diag loaded; `ss -lntu` fails the same way): %w; use --port-driver=builtin and publish ports explicitly", err)
	}
	w := &Watcher{log: log, diag: diag, now: time.Now, after: time.After}
	if w.probe, err = openSockstat(inNS); err != nil {
		log.Debug("implicit: implicit ports: no socket counters, scanning at every wake-up", "err", err)
	}
	return w, nil
}

// Run reports the listeners to the parent over c: at once, then whenever
// they change. It returns nil when ctx ends or the parent closes its end,
// an error if the scan or c fails otherwise. Run owns c and the watcher,
// and closes both; a watcher runs once.
func (w *Watcher) Run(ctx context.Context, c *wire.Conn) error {
	defer w.Close()
	// The parent sends nothing; reading tells when it closes its end.
	parentGone := make(chan struct{})
	go func() {
		defer close(parentGone)
		for {
			var ignored struct{}
			files, err := c.Recv(&ignored)
			wire.CloseFiles(files)
			if err != nil && !errors.Is(err, wire.ErrBadMessage) {
				return
			}
		}
	}()
	defer func() { c.Close(); <-parentGone }()

	var (
		sent, cur []Listener
		fp, lastF []byte
		lastScan  time.Time
		interval  = fastInterval
		first     = true
	)
	for {
		moved := false
		if w.probe != nil {
			var err error
			// Probe before scanning, so that a change during the scan
			// shows at the next probe.
			if fp, err = w.probe.read(fp); err != nil {
				w.log.Debug("implicit: implicit ports: socket counters unreadable, scanning at every wake-up", "err", err)
				w.probe.Close()
				w.probe = nil
			} else {
				moved = !first && !slices.Equal(fp, lastF)
				fp, lastF = lastF, fp
			}
		}
		if first || moved || w.probe == nil || w.now().Sub(lastScan) >= scanInterval {
			var err error
			lastScan = w.now()
			if cur, err = w.diag.Listeners(cur); err != nil {
				return fmt.Errorf("implicit port driver: scan the namespace's sockets: %w", err)
			}
			if first || !slices.Equal(cur, sent) {
				if err := sendSnapshot(c, cur); err != nil {
					if ctx.Err() != nil || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
						return nil // the parent is gone
					}
					return fmt.Errorf("implicit port driver: report the listeners to the parent: %w", err)
				}
				w.log.Debug("implicit: listeners in the namespace", "count", len(cur))
				sent = append(sent[:0], cur...)
				moved = moved || !first
				first = false
			}
		}
		interval = nextInterval(interval, moved)
		select {
		case <-w.after(interval):
		case <-ctx.Done():
			return nil
		case <-parentGone:
			return nil
		}
	}
}

// nextInterval is the wait before the next probe: fastInterval after a
// move, else twice the last wait, up to idleInterval.
func nextInterval(last time.Duration, moved bool) time.Duration {
	if moved {
		return fastInterval
	}
	return min(2*last, idleInterval)
}

// sendSnapshot sends ls in parts of snapshotPart.
func sendSnapshot(c *wire.Conn, ls []Listener) error {
	for {
		part := ls[:min(len(ls), snapshotPart)]
		ls = ls[len(part):]
		if err := c.Send(listenerSnapshot{Listeners: part, More: len(ls) > 0}); err != nil {
			return err
		}
		if len(ls) == 0 {
			return nil
		}
	}
}

// Close releases the watcher's socket and files; Run does it too.
func (w *Watcher) Close() error {
	if w.probe != nil {
		w.probe.Close()
		w.probe = nil
	}
	if w.diag != nil {
		w.diag.Close()
		w.diag = nil
	}
	return nil
}
