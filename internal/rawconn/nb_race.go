//go:build race

package rawconn

import "golang.org/x/sys/unix"

// BigIO: see nb.go.
const BigIO = 32 << 10

// With the race detector, the announced calls, which tell it what the
// kernel read and wrote (nb.go has the unannounced ones).

func Readv(fd int, bufs [][]byte) (int, error)  { return unix.Readv(fd, bufs) }
func Writev(fd int, bufs [][]byte) (int, error) { return unix.Writev(fd, bufs) }
func ReadFD(fd int, b []byte) (int, error)      { return unix.Read(fd, b) }
func EpollPoll(epfd int, events []unix.EpollEvent) (int, error) {
	return unix.EpollWait(epfd, events, 0)
}
