package main

import (
	"os"
	"path/filepath"
)

// dispatch runs the program argv[0] names: gonetns is installed under
// RootlessKit's names too (symlinks), so that the container tools' scripts
// (dockerd-rootless.sh, containerd-rootless.sh, BuildKit) and Docker
// (which runs rootlesskit-docker-proxy as its userland proxy) use it
// unchanged.
//
//	rootlesskit                RootlessKit's command line and defaults
//	docker-rootlesskit         the same (dockerd-rootless.sh looks for it first)
//	rootlessctl                RootlessKit's API client
//	rootlesskit-docker-proxy   Docker's userland proxy for RootlessKit
//	slirp4netns                slirp4netns's command line and API socket
//	anything else              gonetns (and gonetns ctl, gonetns slirp4netns)
func dispatch(argv []string) int {
	name := "gonetns"
	if len(argv) > 0 {
		name = filepath.Base(argv[0])
	}
	args := argv[min(1, len(argv)):]
	switch name {
	case "rootlesskit", "docker-rootlesskit":
		return runLauncher(args, asRootlessKit, name)
	case "rootlessctl":
		return runRootlessctl(args, os.Stdout, os.Stderr)
	case "rootlesskit-docker-proxy":
		return runDockerProxy(args)
	case "slirp4netns":
		return runSlirp4netns(args, name)
	}
	if len(args) > 0 && args[0] == "slirp4netns" {
		return runSlirp4netns(args[1:], "slirp4netns")
	}
	if len(args) > 0 && args[0] == "ctl" {
		return runCtl(args[1:], os.Stdout, os.Stderr)
	}
	return runLauncher(args, asGonetns, "gonetns")
}
