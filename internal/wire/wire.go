// Package wire carries typed messages, and the file descriptors that go with
// them, between the gonetns parent and child over a SOCK_SEQPACKET unix
// socket pair.
//
// One Send is one datagram: a JSON document plus, optionally, file
// descriptors attached with SCM_RIGHTS. Message boundaries are kept by the
// socket type, so readers never see a partial message and concurrent Sends
// never interleave.
package wire

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/rawconn"
)

// MaxMessage is the largest JSON document a message may carry.
const MaxMessage = 64 << 10

// MaxFiles is the largest number of descriptors one message may carry.
const MaxFiles = 16

// ErrBadMessage is wrapped by every Recv error that spoils one message but
// not the stream: one that does not decode into the value asked for, or is
// truncated. The next Recv reads the next message.
var ErrBadMessage = errors.New("wire: bad message")

// ErrTruncated reports a message or its descriptors cut short by the
// receiver's buffers: the peer sent more than MaxMessage or MaxFiles. It
// matches ErrBadMessage too.
var ErrTruncated = fmt.Errorf("%w: truncated", ErrBadMessage)

// Conn is one end of a SOCK_SEQPACKET unix socket pair. Send and Recv may be
// called from different goroutines; several goroutines may Send at once.
// After Close, Send and Recv return an error wrapping net.ErrClosed.
type Conn struct {
	uc *net.UnixConn

	rmu      sync.Mutex // one Recv at a time: they share the buffers
	buf, oob []byte
}

// Socketpair returns the two ends of a new SOCK_SEQPACKET pair as files, both
// close-on-exec. Pass one to a child process (exec.Cmd.ExtraFiles clears
// close-on-exec for it) and wrap the other with FileConn.
func Socketpair() (a, b *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "wire-a"), os.NewFile(uintptr(fds[1]), "wire-b"), nil
}

// FileConn makes a Conn from a socket file (typically one end of Socketpair,
// or a descriptor inherited from the parent). f is duplicated: the caller
// still owns f and may close it.
func FileConn(f *os.File) (*Conn, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("wire: %s is not a socket: %w", f.Name(), err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("wire: %s is a %T, not a unix socket", f.Name(), c)
	}
	return &Conn{uc: uc}, nil
}

// Send writes v as one message with files attached. The files stay owned by
// the caller (the kernel duplicates them into the message); close them after
// Send returns if they are no longer needed here.
func (c *Conn) Send(v any, files ...*os.File) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("wire: encode %T: %w", v, err)
	}
	if len(b) > MaxMessage {
		return fmt.Errorf("wire: %T encodes to %d bytes, more than %d", v, len(b), MaxMessage)
	}
	if len(files) > MaxFiles {
		return fmt.Errorf("wire: %d files in one message, more than %d", len(files), MaxFiles)
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			// Not f.Fd(): for a file from net.Conn.File (the usual case
			// here) Fd clears O_NONBLOCK on the open file description,
			// which is shared with every duplicate of the descriptor,
			// including live net.Conns in this process and the copy the
			// peer receives.
			fd, err := rawFd(f)
			if err != nil {
				return fmt.Errorf("wire: send %T: file %d (%s): %w", v, i, f.Name(), err)
			}
			fds[i] = fd
		}
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.uc.WriteMsgUnix(b, oob, nil)
	// The descriptors in oob belong to files; keep them from being closed by
	// a finalizer before sendmsg has duplicated them into the message.
	runtime.KeepAlive(files)
	if err != nil {
		return fmt.Errorf("wire: send %T: %w", v, err)
	}
	if n != len(b) || oobn != len(oob) {
		return fmt.Errorf("wire: send %T: short write (%d of %d bytes)", v, n, len(b))
	}
	return nil
}

// Recv reads one message into v (which must be a pointer) and returns the
// files that came with it; the caller owns them. The descriptors arrive
// close-on-exec. At end of stream (the peer closed its end) Recv returns
// io.EOF.
func (c *Conn) Recv(v any) ([]*os.File, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.buf == nil {
		c.buf = make([]byte, MaxMessage+1)
		c.oob = make([]byte, unix.CmsgSpace(MaxFiles*4))
	}
	buf, oob := c.buf, c.oob
	rc, err := c.uc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("wire: %w", err)
	}
	var oobn, flags int
	n, err := rawconn.Read(rc, func(fd int) (int, error) {
		var n int
		var err error
		n, oobn, flags, _, err = unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		return n, err
	})
	if err != nil {
		return nil, fmt.Errorf("wire: receive: %w", err)
	}
	files, ferr := parseRights(oob[:oobn])
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > MaxMessage {
		CloseFiles(files)
		return nil, ErrTruncated
	}
	if ferr != nil {
		CloseFiles(files)
		return nil, ferr
	}
	if n == 0 && len(files) == 0 {
		return nil, io.EOF
	}
	if err := json.Unmarshal(buf[:n], v); err != nil {
		// Any decoding error: a syntax error, a wrong type, and also
		// what a field's own UnmarshalText returns (a bad netip.Addr).
		CloseFiles(files)
		return nil, fmt.Errorf("%w: decode %T: %w", ErrBadMessage, v, err)
	}
	return files, nil
}

// Close closes this end; the peer's Recv then returns io.EOF.
func (c *Conn) Close() error {
	return c.uc.Close()
}

// File returns a duplicate of the underlying socket (for handing to a
// child process). The caller closes it.
func (c *Conn) File() (*os.File, error) {
	return c.uc.File()
}

// rawFd returns f's descriptor without changing its blocking mode (which
// f.Fd would do).
func rawFd(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, err
	}
	return fd, nil
}

func parseRights(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("wire: control message: %w", err)
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("wire-fd-%d", fd)))
		}
	}
	return files, nil
}

// CloseFiles closes files, such as those a Recv returned that are not
// wanted.
func CloseFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}
