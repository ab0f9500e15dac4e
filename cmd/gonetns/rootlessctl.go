package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"github.com/spf13/pflag"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/port"
)

const rootlessctlUsage = `NAME:
   rootlessctl - RootlessKit API client (gonetns)

USAGE:
   rootlessctl [global options] command [command options] [arguments...]

COMMANDS:
   list-ports    List ports
   add-ports     Add ports
   remove-ports  Remove ports
   info          Show info

GLOBAL OPTIONS:
`

// runRootlessctl is gonetns invoked as rootlessctl: RootlessKit's API
// client, with its command line and its output, byte for byte where
// scripts read it (the port table, the JSON lines, the info list).
//
//	rootlessctl [--debug] [--socket PATH] list-ports [--json]
//	rootlessctl [--socket PATH] add-ports [--json] SPEC...
//	rootlessctl [--socket PATH] remove-ports ID...
//	rootlessctl [--socket PATH] info [--json]
//
// Errors are "error: ..." on stderr and exit status 1, as RootlessKit's.
func runRootlessctl(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("rootlessctl", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.SetInterspersed(false)
	fs.Usage = func() {}
	socket := fs.String("socket", "", `Path to api.sock (under the "rootlesskit --state-dir" directory), defaults to $ROOTLESSKIT_STATE_DIR/api.sock`)
	fs.Bool("debug", false, "debug mode")
	showVersion := fs.BoolP("version", "v", false, "print the version")
	fail := func(err error) int {
		fmt.Fprintf(stderr, "error: %v\n", err)
		return 1
	}
	if err := fs.Parse(singleDashLongFlags(fs, args)); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, rootlessctlUsage+fs.FlagUsages())
			return 0
		}
		return fail(err)
	}
	if *showVersion {
		fmt.Fprintf(stdout, "rootlessctl version %s (gonetns %s)\n", rootlessKitVersion, gonetnsVersion())
		return 0
	}
	if fs.NArg() == 0 || fs.Arg(0) == "help" {
		fmt.Fprint(stdout, rootlessctlUsage+fs.FlagUsages())
		return 0
	}
	cmd, rest := fs.Arg(0), fs.Args()[1:]
	cf := pflag.NewFlagSet("rootlessctl "+cmd, pflag.ContinueOnError)
	cf.SetOutput(stderr)
	cf.Usage = func() {}
	jsonOut := new(bool)
	switch cmd {
	case "list-ports", "add-ports", "info":
		jsonOut = cf.Bool("json", false, "Prints as JSON")
	case "remove-ports":
	default:
		return fail(fmt.Errorf("no such command %q: use list-ports, add-ports, remove-ports or info", cmd))
	}
	if err := cf.Parse(singleDashLongFlags(cf, rest)); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(stdout, "%s\n\nOPTIONS:\n%s", ctlCommandUsage[cmd], cf.FlagUsages())
			return 0
		}
		return fail(err)
	}
	rest = cf.Args()

	var action func(ctx context.Context, c *api.Client) error
	switch cmd {
	case "list-ports":
		action = func(ctx context.Context, c *api.Client) error { return ctlListPorts(ctx, c, *jsonOut, stdout) }
	case "info":
		action = func(ctx context.Context, c *api.Client) error { return ctlInfo(ctx, c, *jsonOut, true, stdout) }
	case "add-ports":
		if len(rest) == 0 {
			return fail(errors.New("no port specified"))
		}
		var specs []port.Spec
		for _, a := range rest {
			s, err := port.ParseSpec(a)
			if err != nil {
				return fail(err)
			}
			specs = append(specs, s)
		}
		action = func(ctx context.Context, c *api.Client) error { return ctlAddPorts(ctx, c, specs, *jsonOut, stdout) }
	case "remove-ports":
		if len(rest) == 0 {
			return fail(errors.New("no ID specified"))
		}
		var ids []int
		for _, a := range rest {
			id, err := strconv.Atoi(a)
			if err != nil {
				return fail(fmt.Errorf("bad port ID %q: %w", a, err))
			}
			ids = append(ids, id)
		}
		action = func(ctx context.Context, c *api.Client) error { return ctlRemovePorts(ctx, c, ids, stdout) }
	}
	path := *socket
	if path == "" {
		dir := os.Getenv("ROOTLESSKIT_STATE_DIR")
		if dir == "" {
			return fail(errors.New("please specify --socket or set $ROOTLESSKIT_STATE_DIR"))
		}
		path = filepath.Join(dir, "api.sock")
	}
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	if err := action(ctx, api.NewClient(path)); err != nil {
		return fail(err)
	}
	return 0
}
