package wire

import (
	"encoding/json"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// controlMessage has the shape of the parent/child control messages
// (userns's message, portfwd's dial replies): what the parent decodes from
// a child that a process in the sandbox may have taken over.
type controlMessage struct {
	Type   string          `json:"type"`
	ID     uint64          `json:"id"`
	Signal int             `json:"signal,omitempty"`
	PID    int             `json:"pid,omitempty"`
	Error  string          `json:"error,omitempty"`
	Errno  int             `json:"errno,omitempty"`
	Info   json.RawMessage `json:"info,omitempty"`
	Config *struct {
		Args  []string `json:"args"`
		Env   []string `json:"env"`
		Extra int      `json:"extraFiles"`
	} `json:"config,omitempty"`
}

// FuzzRecv sends arbitrary datagrams, with up to 20 descriptors attached,
// and receives them as control messages: Recv never panics, and when it
// fails no received descriptor is left open.
func FuzzRecv(f *testing.F) {
	f.Add([]byte(`{"type":"network","info":{"name":"tap0","vnetHdr":true}}`), uint8(1))
	f.Add([]byte(`{"type":"started","pid":7}`), uint8(0))
	f.Add([]byte(`{"id":3,"error":"connect: connection refused","errno":111}`), uint8(0))
	f.Add([]byte(`{"id":3}`), uint8(2))
	f.Add([]byte(`{"type":`), uint8(1))
	f.Add([]byte(`{"config":{"args":["sh"],"extraFiles":-1}}`), uint8(0))
	f.Add([]byte{}, uint8(3))
	f.Add([]byte("\x00\xff"), uint8(20))
	f.Fuzz(func(t *testing.T, data []byte, nfds uint8) {
		if len(data) > MaxMessage+16 {
			return
		}
		a, b, err := Socketpair()
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		defer b.Close()
		rc, err := FileConn(b)
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		devnull, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		defer devnull.Close()
		fds := make([]int, int(nfds)%21)
		for i := range fds {
			fds[i] = int(devnull.Fd())
		}
		var oob []byte
		if len(fds) > 0 {
			oob = unix.UnixRights(fds...)
		}
		before := openFDs(t)
		if err := unix.Sendmsg(int(a.Fd()), data, oob, nil, 0); err != nil {
			return // e.g. too many descriptors for one message
		}
		var m controlMessage
		files, err := rc.Recv(&m)
		if err != nil {
			if files != nil {
				t.Fatalf("Recv failed (%v) but returned %d files", err, len(files))
			}
			if after := openFDs(t); after != before {
				t.Fatalf("Recv failed (%v) and left %d descriptors open (before %d)", err, after, before)
			}
			return
		}
		CloseFiles(files)
	})
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
