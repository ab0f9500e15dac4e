package userns

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// setupMounts prepares the child's mount namespace: propagation, a sysfs
// and procfs that show the new namespaces, the copied-up directories, and
// resolv.conf/hosts for the sandbox's DNS.
func setupMounts(cfg *childConfig, log *slog.Logger) error {
	// The working directory, by its path: mounts do not move a process
	// that is in a directory they cover.
	wd, wdErr := os.Getwd()
	prop, err := ParsePropagation(cfg.Propagation)
	if err != nil {
		return err
	}
	if err := unix.Mount("none", "/", "", prop|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("set mount propagation of / to %s: %w", cfg.Propagation, err)
	}

	// Scratch space for mount points that must not be visible anywhere: a
	// tmpfs on a directory of the state dir, gone when setup is done. It is
	// used through a descriptor, because copying up a directory that holds
	// the state dir (dockerd-rootless does --copy-up=/run with its state
	// under /run/user) hides its path. The parent removes the directory.
	dir, err := os.MkdirTemp(cfg.StateDir, scratchPrefix)
	if err != nil {
		return fmt.Errorf("scratch directory for mounts: %w", err)
	}
	if err := unix.Mount("none", dir, "tmpfs", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount a scratch tmpfs on %s: %w", dir, err)
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		return fmt.Errorf("scratch directory for mounts: %w", err)
	}
	scratch := fmt.Sprintf("/proc/self/fd/%d", fd)
	defer unix.Close(fd)
	defer unix.Unmount(scratch, unix.MNT_DETACH)

	if cfg.NewNet {
		mountSysfs(scratch, cfg.Cgroup2, log)
	}
	if cfg.Cgroup2 {
		if err := mountCgroup2(!cfg.NewNet); err != nil {
			return err
		}
	}
	for _, dir := range cfg.CopyUp {
		if err := copyUp(filepath.Clean(dir), scratch); err != nil {
			return err
		}
		log.Debug("copied up", "dir", dir)
	}
	if cfg.DNSFiles {
		etcCopied := slices.ContainsFunc(cfg.CopyUp, func(d string) bool { return filepath.Clean(d) == "/etc" })
		for _, name := range []string{ResolvConf, HostsFile} {
			if err := installEtcFile(filepath.Join(cfg.StateDir, name), "/etc/"+name, etcCopied); err != nil {
				return err
			}
		}
		if !etcCopied {
			log.Debug("/etc/resolv.conf and /etc/hosts are bind mounts from the state directory; " +
				"if the host replaces its files, the mounts go with them (use --copy-up=/etc to avoid it)")
		}
	}
	// Entered again through the new mounts: a command started in a
	// directory that was copied up (cd /etc; gonetns --copy-up=/etc ...)
	// wrote its relative paths into the host's directory, under the copy
	// (RootlessKit 1.1 does the same).
	if wdErr == nil {
		if err := os.Chdir(wd); err != nil {
			log.Debug("could not enter the working directory again after the mounts", "dir", wd, "err", err)
		}
	}
	return nil
}

// scratchPrefix names the scratch directories setupMounts makes in the
// state directory.
const scratchPrefix = ".mnt-"

const cgroupDir = "/sys/fs/cgroup"

// mountSysfs mounts a sysfs that belongs to the new network namespace, so
// that /sys/class/net lists its interfaces, keeping the host's cgroup
// mount visible underneath (unless a cgroup2 of the namespace's own is to
// be mounted there: skipCgroup).
func mountSysfs(scratch string, skipCgroup bool, log *slog.Logger) {
	cg := filepath.Join(scratch, "cgroup")
	haveCgroup := false
	if st, err := os.Stat(cgroupDir); err == nil && st.IsDir() && !skipCgroup {
		if err := os.Mkdir(cg, 0o700); err == nil {
			haveCgroup = unix.Mount(cgroupDir, cg, "", unix.MS_BIND|unix.MS_REC, "") == nil
		}
	}
	err := unix.Mount("none", "/sys", "sysfs", 0, "")
	if err != nil {
		// A read-only sysfs outside allows only a read-only one inside.
		err = unix.Mount("none", "/sys", "sysfs", unix.MS_RDONLY, "")
	}
	if err != nil {
		msg := "cannot mount sysfs for the new network namespace; /sys/class/net shows the host's interfaces"
		if errors.Is(err, unix.EPERM) {
			// The kernel mounts a sysfs in a user namespace only where the
			// one outside hides nothing: a container engine's masked paths
			// (Docker's /sys/firmware) hide some.
			msg += " (in a container, the engine's masked paths forbid it: Docker's --security-opt systempaths=unconfined lifts them)"
		}
		log.Warn(msg, "err", err)
		if haveCgroup {
			unix.Unmount(cg, unix.MNT_DETACH)
		}
		return
	}
	if haveCgroup {
		if err := unix.Mount(cg, cgroupDir, "", unix.MS_MOVE, ""); err != nil {
			log.Warn("cannot keep the cgroup filesystem under the new sysfs", "err", err)
			unix.Unmount(cg, unix.MNT_DETACH)
		}
	}
}

// mountCgroup2 mounts a cgroup2 filesystem of the command's cgroup
// namespace on /sys/fs/cgroup, so that what the command sees in
// /proc/self/cgroup (after --evacuate-cgroup2, "/NAME") is where it
// finds it, as RootlessKit does. Over the host's sysfs (no new network
// namespace) a tmpfs goes first: cgroup2 cannot be mounted on the host's
// cgroup mount point directly (EBUSY).
func mountCgroup2(overHostSysfs bool) error {
	if overHostSysfs {
		if err := unix.Mount("none", cgroupDir, "tmpfs", 0, "mode=0755"); err != nil {
			return fmt.Errorf("--evacuate-cgroup2: mount a tmpfs on %s: %w", cgroupDir, err)
		}
	}
	if err := unix.Mount("none", cgroupDir, "cgroup2", 0, ""); err != nil {
		return fmt.Errorf("--evacuate-cgroup2: mount cgroup2 on %s: %w (is cgroup v2 available to this user?)", cgroupDir, err)
	}
	return nil
}

// copyUp replaces dir with a writable tmpfs whose entries are symlinks into
// a bind mount of the original (RootlessKit's tmpfs+symlink mode): files
// can be added, removed and replaced inside, while the host's files are
// never touched by those changes.
func copyUp(dir, scratch string) error {
	orig, err := os.MkdirTemp(scratch, "orig-")
	if err != nil {
		return fmt.Errorf("copy up %s: %w", dir, err)
	}
	if err := unix.Mount(dir, orig, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("copy up %s: bind the original: %w", dir, err)
	}
	if err := unix.Mount("none", dir, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("copy up %s: mount a tmpfs on it: %w", dir, err)
	}
	ro, err := os.MkdirTemp(dir, ".ro")
	if err != nil {
		return fmt.Errorf("copy up %s: %w", dir, err)
	}
	if err := unix.Mount(orig, ro, "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("copy up %s: move the original into place: %w", dir, err)
	}
	entries, err := os.ReadDir(ro)
	if err != nil {
		return fmt.Errorf("copy up %s: %w", dir, err)
	}
	base := filepath.Base(ro)
	for _, e := range entries {
		target := filepath.Join(base, e.Name())
		if e.Type()&os.ModeSymlink != 0 {
			// Keep symlinks as they are, so relative and absolute links
			// resolve as on the host.
			if target, err = os.Readlink(filepath.Join(ro, e.Name())); err != nil {
				return fmt.Errorf("copy up %s: %w", dir, err)
			}
		}
		if err := os.Symlink(target, filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("copy up %s: %w", dir, err)
		}
	}
	return nil
}

// installEtcFile makes dst show src: a real file in a copied-up /etc, a bind
// mount otherwise.
func installEtcFile(src, dst string, etcCopied bool) error {
	if etcCopied {
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if err := os.Remove(dst); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("replace %s: %w", dst, err)
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", dst, err)
		}
		return nil
	}
	if _, err := os.Stat(dst); err != nil {
		return fmt.Errorf("cannot bind %s over %s (%v): use --copy-up=/etc so gonetns can write its own", src, dst, err)
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s over %s: %w (try --copy-up=/etc)", src, dst, err)
	}
	return nil
}
