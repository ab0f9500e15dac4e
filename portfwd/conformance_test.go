package portfwd_test

import (
	"testing"

	"github.com/gonetns/gonetns/portfwd/portfwdtest"
)

func TestConformanceWireProtocol(t *testing.T) {
	portfwdtest.Run(t, portfwdtest.WireChild)
}

func TestConformanceInProcessDialer(t *testing.T) {
	portfwdtest.Run(t, portfwdtest.InProcessChild)
}
