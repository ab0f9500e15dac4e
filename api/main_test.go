package api

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// idleHolderEnv makes this test binary an idle client of the API instead
// of running tests: "SOCKET COUNT" opens COUNT connections that never
// send, says "held", then renews them (closes its oldest, opens a new one)
// 500 times a second until its standard input closes. A process of its
// own, as a program holding connections open would be.
//
// Renewing as fast as it can would be a flood, not connections held: a
// client that connects faster than the server accepts and closes fills
// the kernel's listen queue (net.core.somaxconn, 4096), and then every
// client's connect fails with EAGAIN whatever the server does. Under the
// race detector on a loaded 2-core machine the server accepted about
// 1,500 connections a second: 2,000 renewals a second filled the queue
// within the burst (10 of 1,000 deletes could not connect, 1 run in 3).
const idleHolderEnv = "API_TEST_IDLE_HOLDER"

func TestMain(m *testing.M) {
	if arg := os.Getenv(idleHolderEnv); arg != "" {
		if err := holdIdle(arg); err != nil {
			fmt.Fprintln(os.Stderr, "idle holder:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func holdIdle(arg string) error {
	path, countText, _ := strings.Cut(arg, " ")
	count, err := strconv.Atoi(countText)
	if err != nil {
		return err
	}
	dial := func() (net.Conn, error) {
		for {
			c, err := net.Dial("unix", path)
			if !errors.Is(err, syscall.EAGAIN) {
				return c, err
			}
			// The listen queue is full: the server is behind.
			time.Sleep(100 * time.Microsecond)
		}
	}
	held := make([]net.Conn, count)
	for i := range held {
		if held[i], err = dial(); err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
	}
	fmt.Println("held")
	stop := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()
	renewed := 0
	pace := time.NewTicker(2 * time.Millisecond)
	defer pace.Stop()
	for i := 0; ; i = (i + 1) % count {
		select {
		case <-stop:
			fmt.Println("renewed", renewed)
			return nil
		case <-pace.C:
		}
		c, err := dial()
		if err != nil {
			return err
		}
		held[i].Close()
		held[i] = c
		renewed++
	}
}
