package confine

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/landlock-lsm/go-landlock/landlock"
	llsys "github.com/landlock-lsm/go-landlock/landlock/syscall"
	"golang.org/x/sys/unix"
)

// Files are the file system accesses the process keeps under Landlock;
// everything else of the file system is refused (EACCES). Descriptors
// already open are not affected: files opened before, sockets and devices
// received keep working. /proc/self stays readable in any case.
type Files struct {
	// ReadWriteDirs are hierarchies the process may still read, create,
	// write and remove files and directories in (a state directory).
	ReadWriteDirs []string
	// ReadDirs are hierarchies it may still read.
	ReadDirs []string
	// ReadFiles are files it may still open for reading, e.g. a
	// resolv.conf that is read again while running. A file replaced by
	// another (an editor's rename) is a new file, which the rule does not
	// cover: name the directory in ReadDirs for that.
	ReadFiles []string
	// WriteFiles are files it may still open for writing.
	WriteFiles []string
	// RemoveDirsIn are directories in which it may remove a directory
	// (only that: the parent of a state directory that is removed at
	// exit). The right covers the whole hierarchy below them.
	RemoveDirsIn []string
}

// Access rights of the rules. Nothing may be executed: the process runs
// no program after set-up, and a file it could write and then execute
// would undo the rest.
const (
	readDir      = llsys.AccessFSReadFile | llsys.AccessFSReadDir
	readWriteDir = readDir | llsys.AccessFSWriteFile | llsys.AccessFSTruncate |
		llsys.AccessFSRemoveDir | llsys.AccessFSRemoveFile | llsys.AccessFSMakeDir |
		llsys.AccessFSMakeReg | llsys.AccessFSMakeSock | llsys.AccessFSMakeFifo | llsys.AccessFSMakeSym
)

// procSelf keeps /proc/self open once Landlock is applied: a rule is
// attached to an inode, and procfs makes a new inode for /proc/PID each
// time its dentry is looked up afresh; an open descriptor keeps the
// dentry, and so the rule's inode, in place.
var (
	procSelfMu sync.Mutex
	procSelf   *os.File
)

// Landlock restricts the process's file system access to f (and
// /proc/self), with every access right the running kernel's Landlock ABI
// knows, and scopes abstract unix sockets to the process (it cannot
// connect to those of other programs, e.g. an X server's or D-Bus's). The
// network is not restricted: a network process connects and listens
// anywhere.
func Landlock(f Files) Result {
	abi, err := llsys.LandlockGetABIVersion()
	switch {
	case errors.Is(err, unix.ENOSYS):
		return notAvailable("the kernel has no Landlock (Linux 5.13 or later built with CONFIG_SECURITY_LANDLOCK)")
	case errors.Is(err, unix.EOPNOTSUPP):
		return notAvailable("Landlock is not enabled at boot (add landlock to the kernel's lsm= parameter)")
	case err != nil:
		return notAvailable("%v", err)
	case abi < 1:
		return notAvailable("the kernel reports Landlock ABI %d", abi)
	}
	if abi >= 6 {
		// go-landlock uses ABI 5 on kernels whose signal scoping has a
		// known bug (fixed in 6.12 LTS updates), and so does the report.
		if errata, err := llsys.LandlockGetErrata(); err != nil || errata&0x2 == 0 {
			abi = 5
		}
	}
	prepare()
	self, err := os.Open("/proc/self")
	if err != nil {
		return failed(fmt.Errorf("open /proc/self: %w", err))
	}
	rules := []landlock.Rule{
		landlock.PathAccess(readDir, self.Name()),
		landlock.PathAccess(readWriteDir, f.ReadWriteDirs...),
		landlock.PathAccess(readDir, f.ReadDirs...),
		landlock.PathAccess(llsys.AccessFSReadFile, f.ReadFiles...),
		landlock.PathAccess(llsys.AccessFSWriteFile|llsys.AccessFSTruncate, f.WriteFiles...),
		landlock.PathAccess(llsys.AccessFSRemoveDir, f.RemoveDirsIn...),
	}
	for _, p := range append(append(append(append(append([]string(nil), f.ReadWriteDirs...), f.ReadDirs...), f.ReadFiles...), f.WriteFiles...), f.RemoveDirsIn...) {
		if !filepath.IsAbs(p) {
			self.Close()
			return failed(fmt.Errorf("landlock rule for %q: the path must be absolute", p))
		}
	}
	cfg := landlock.Config{
		HandledAccessFS: landlock.V11.HandledAccessFS,
		Scoped:          llsys.ScopeAbstractUnixSocket,
	}.BestEffort()
	if err := cfg.Restrict(rules...); err != nil {
		self.Close()
		return failed(fmt.Errorf("landlock: %w", err))
	}
	procSelfMu.Lock()
	if procSelf == nil {
		procSelf = self
	} else {
		self.Close()
	}
	procSelfMu.Unlock()
	if abi > 11 {
		// go-landlock knows rights up to ABI 11; a newer kernel enforces
		// those.
		abi = 11
	}
	return Result{Applied: true, Detail: fmt.Sprintf("ABI %d applied", abi)}
}
