package implicit

import (
	"bytes"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// sockstatProbe is the cheap trigger of the listener watcher: the
// namespace's socket counters in /proc/net/sockstat and sockstat6 ("TCP:
// inuse 3 ..."). A TCP socket is counted when it is hashed (listen(2),
// connect(2), accept(2)) and a UDP socket when it is bound, so a server
// that starts or stops listening moves them. Reading both costs ~7 µs
// here against 1-2.5 ms for a sock_diag scan once the kernel's tables are
// out of the cache (the walk of the listening and UDP hash tables, which
// all namespaces share), so the watcher probes often and scans only when
// the counters move, and once a second anyway: a listener that closes
// while another socket opens between two probes leaves the counts as they
// were.
type sockstatProbe struct {
	files [2]*os.File
	buf   []byte
}

// openSockstat opens the counters of the namespace that create runs its
// argument in. /proc/thread-self, not /proc/self: with --detach-netns only
// the thread that create runs on is in the sandbox's namespace, and the
// procfs file stays bound to the namespace it was opened in.
func openSockstat(create func(fn func() error) error) (*sockstatProbe, error) {
	p := &sockstatProbe{buf: make([]byte, 4096)}
	err := create(func() error {
		for i, name := range []string{"/proc/thread-self/net/sockstat", "/proc/thread-self/net/sockstat6"} {
			f, err := os.Open(name)
			if err != nil {
				return err
			}
			p.files[i] = f
		}
		return nil
	})
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("open the namespace's socket counters: %w", err)
	}
	return p, nil
}

// read appends the counters' fingerprint to fp[:0].
func (p *sockstatProbe) read(fp []byte) ([]byte, error) {
	fp = fp[:0]
	for _, f := range p.files {
		// pread at 0 restarts the seq_file without a seek.
		n, err := unix.Pread(int(f.Fd()), p.buf, 0)
		if err != nil {
			return fp, fmt.Errorf("read %s: %w", f.Name(), err)
		}
		fp = sockstatFingerprint(p.buf[:n], fp)
	}
	return fp, nil
}

// sockstatFingerprint appends to fp the value after each "inuse" in a
// sockstat file, each followed by a comma, and skips the rest (memory and
// TIME-WAIT counts move with traffic, not with listeners).
func sockstatFingerprint(b, fp []byte) []byte {
	key := []byte("inuse ")
	for {
		i := bytes.Index(b, key)
		if i < 0 {
			return fp
		}
		b = b[i+len(key):]
		j := 0
		for j < len(b) && b[j] >= '0' && b[j] <= '9' {
			j++
		}
		fp = append(append(fp, b[:j]...), ',')
		b = b[j:]
	}
}

// Close closes the files.
func (p *sockstatProbe) Close() error {
	for _, f := range p.files {
		if f != nil {
			f.Close()
		}
	}
	return nil
}
