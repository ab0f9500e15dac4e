package sandbox

import (
	"os"
	"strings"
)

// Where the kernel says how its idle CPUs wait: the cpuidle driver, and
// the guest halt-polling of the haltpoll driver (the longest it polls
// before it halts, in ns; 0 is never).
const (
	cpuidleDriverFile = "/sys/devices/system/cpu/cpuidle/current_driver"
	haltPollNSFile    = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"
	cpuDir            = "/sys/devices/system/cpu"
)

// idleCPUsHalt reports whether this machine's idle CPUs halt at once,
// without polling first, with why. There a thread that sleeps between a
// request and its answer pays for its CPU's halt and wake-up (on a
// virtual machine an exit to the hypervisor each, and an interrupt
// between CPUs): the event loop polls instead (--busy-poll=auto). With a
// cpuidle driver that picks among idle states (intel_idle, acpi_idle,
// psci_idle: bare metal, mostly) or that polls (haltpoll with its poll
// on), it does not.
func idleCPUsHalt() (bool, string) {
	driver, err := os.ReadFile(cpuidleDriverFile)
	switch {
	case os.IsNotExist(err):
		if _, err := os.Stat(cpuDir); err != nil {
			return false, "cannot tell how idle CPUs wait (" + cpuDir + " unreadable)"
		}
		driver = []byte("none")
	case err != nil:
		return false, "cannot tell how idle CPUs wait: " + err.Error()
	}
	pollNS, _ := os.ReadFile(haltPollNSFile)
	return haltsWithoutPolling(strings.TrimSpace(string(driver)), strings.TrimSpace(string(pollNS)))
}

// haltsWithoutPolling decides idleCPUsHalt from the cpuidle driver's name
// and the haltpoll driver's guest_halt_poll_ns.
func haltsWithoutPolling(driver, haltPollNS string) (bool, string) {
	switch {
	case driver == "none" || driver == "":
		return true, "no cpuidle driver: idle CPUs halt at once"
	case driver == "haltpoll" && haltPollNS == "0":
		return true, "cpuidle driver haltpoll with guest_halt_poll_ns=0: idle CPUs halt at once"
	case driver == "haltpoll":
		return false, "cpuidle driver haltpoll polls before it halts (guest_halt_poll_ns=" + haltPollNS + ")"
	}
	return false, "cpuidle driver " + driver + " chooses the idle states"
}
