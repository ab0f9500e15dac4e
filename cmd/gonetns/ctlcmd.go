package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/userns"
)

// The REST API's client commands, once for both of their command lines:
// `gonetns ctl` and the rootlessctl personality parse the same commands
// with the same checks, and differ only in how they talk (ctlMode).

// ctlCommand is one API command.
type ctlCommand struct {
	name string
	args string // the arguments, for usage lines: "SPEC...", "ID..." or ""
	json bool   // has --json
	// short is gonetns ctl's line in the command list, more the lines
	// under it; summary is rootlessctl's (RootlessKit's words).
	short, more, summary string
	// help is the text of `COMMAND --help` after its usage line.
	help string
	// parse checks the arguments before the server is looked for: all of
	// them, so that a bad SPEC among good ones publishes nothing.
	parse func(args []string) (ctlAction, error)
}

// ctlAction runs a parsed command against the API.
type ctlAction func(ctx context.Context, c *api.Client, o ctlOutput) error

// ctlOutput is where and how an action prints.
type ctlOutput struct {
	w    io.Writer
	json bool // --json
	// rootlessKit: show only RootlessKit's own fields, as its rootlessctl
	// does (scripts compare them).
	rootlessKit bool
}

var ctlCommands = []ctlCommand{
	{
		name: "list-ports", json: true, short: "list the published ports", summary: "List ports",
		help:  "Lists the published ports: a table, or one JSON object per line with --json.",
		parse: noArgs("list-ports", func(ctx context.Context, c *api.Client, o ctlOutput) error { return ctlListPorts(ctx, c, o) }),
	},
	{
		name: "add-ports", args: "SPEC...", json: true, summary: "Add ports",
		short: "publish ports; SPEC is " + port.Grammar,
		more:  "e.g. 8080:80/tcp, 127.0.0.1:8080:80/tcp, [::1]:8080:[::1]:80/tcp6",
		help: "Publishes ports and prints each new ID (the status as JSON with --json).\nSPEC is " +
			port.Grammar + ", PROTO one of " + strings.Join(port.Protos, ", ") +
			",\nIPv6 addresses in brackets: 8080:80/tcp, 127.0.0.1:8080:80/tcp, [::1]:8080:[::1]:80/tcp6.",
		parse: func(args []string) (ctlAction, error) {
			if len(args) == 0 {
				return nil, ctlUsageErr("add-ports: no SPEC given, e.g. 127.0.0.1:8080:80/tcp")
			}
			specs := make([]port.Spec, 0, len(args))
			for _, a := range args {
				s, err := port.ParseSpec(a)
				if err != nil {
					return nil, err
				}
				specs = append(specs, s)
			}
			return func(ctx context.Context, c *api.Client, o ctlOutput) error {
				return ctlAddPorts(ctx, c, specs, o.json, o.w)
			}, nil
		},
	},
	{
		name: "remove-ports", args: "ID...", short: "unpublish ports by the ID list-ports shows", summary: "Remove ports",
		help: "Unpublishes ports by the ID list-ports shows and prints each removed ID.",
		parse: func(args []string) (ctlAction, error) {
			if len(args) == 0 {
				return nil, ctlUsageErr("remove-ports: no ID given (see list-ports)")
			}
			ids := make([]int, 0, len(args))
			for _, a := range args {
				id, err := strconv.Atoi(a)
				if err != nil || id < 1 {
					return nil, fmt.Errorf("bad port ID %q: want the number list-ports shows", a)
				}
				ids = append(ids, id)
			}
			return func(ctx context.Context, c *api.Client, o ctlOutput) error {
				return ctlRemovePorts(ctx, c, ids, o.w)
			}, nil
		},
	},
	{
		name: "info", json: true, short: "show the API, state directory, child PID and drivers", summary: "Show info",
		help: "Shows the API version, state directory, child PID and drivers.",
		parse: noArgs("info", func(ctx context.Context, c *api.Client, o ctlOutput) error {
			return ctlInfo(ctx, c, o.json, o.rootlessKit, o.w)
		}),
	},
}

func noArgs(name string, a ctlAction) func([]string) (ctlAction, error) {
	return func(args []string) (ctlAction, error) {
		if len(args) > 0 {
			return nil, ctlUsageErr(fmt.Sprintf("%s takes no arguments, got %q", name, args))
		}
		return a, nil
	}
}

func ctlCommandNamed(name string) (ctlCommand, bool) {
	for _, c := range ctlCommands {
		if c.name == name {
			return c, true
		}
	}
	return ctlCommand{}, false
}

// synopsis is "NAME [--json] ARGS".
func (c ctlCommand) synopsis() string {
	s := c.name
	if c.json {
		s += " [--json]"
	}
	if c.args != "" {
		s += " " + c.args
	}
	return s
}

// ctlUsageError marks a command line of the wrong shape (a missing or
// extra argument, an unknown flag or command): gonetns ctl exits 2 for
// it, as for any bad usage, and points at --help.
type ctlUsageError struct{ msg string }

func (e *ctlUsageError) Error() string { return e.msg }

func ctlUsageErr(msg string) error { return &ctlUsageError{msg} }

// ctlMode is one of the two command lines of the API client.
type ctlMode struct {
	prog string // "gonetns ctl", "rootlessctl"
	// rootlessKit is RootlessKit's rootlessctl: its usage text, -socket
	// with one dash, --debug and --version, "help", errors as "error:
	// ..." with status 1 whatever went wrong, extra arguments ignored (its
	// CLI library does), and RootlessKit's fields only in info.
	rootlessKit bool
	// stateDirEnv: where the socket is looked for without --socket, in
	// order, as $VAR/api.sock.
	stateDirEnv []string
	noSocket    string // the error when none is set
}

var (
	gonetnsCtl = ctlMode{
		prog:        "gonetns ctl",
		stateDirEnv: []string{"GONETNS_STATE_DIR", "ROOTLESSKIT_STATE_DIR"},
		noSocket:    "no API socket: pass --socket PATH, or set $GONETNS_STATE_DIR (gonetns sets it for the command it runs) or $ROOTLESSKIT_STATE_DIR",
	}
	rootlessctlMode = ctlMode{
		prog: "rootlessctl", rootlessKit: true,
		stateDirEnv: []string{"ROOTLESSKIT_STATE_DIR"},
		noSocket:    "please specify --socket or set $ROOTLESSKIT_STATE_DIR",
	}
)

// ctlTimeout bounds one invocation's API calls.
const ctlTimeout = 30 * time.Second

// runCtl runs `gonetns ctl ARGS...` (args exclude "ctl") and returns the
// exit status: 0 success, 1 failure, 2 bad usage.
func runCtl(args []string, stdout, stderr io.Writer) int {
	return gonetnsCtl.run(args, stdout, stderr)
}

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
	return rootlessctlMode.run(args, stdout, stderr)
}

func (m ctlMode) run(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet(m.prog, pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {}
	fs.SetInterspersed(false) // flags after COMMAND are the command's
	var socket *string
	var showVersion *bool
	if m.rootlessKit {
		socket = fs.String("socket", "", `Path to api.sock (under the "rootlesskit --state-dir" directory), defaults to $ROOTLESSKIT_STATE_DIR/api.sock`)
		fs.Bool("debug", false, "debug mode")
		showVersion = fs.BoolP("version", "v", false, "print the version")
		args = singleDashLongFlags(fs, args)
	} else {
		socket = fs.String("socket", "", "path to the API socket (api.sock in the state directory)")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, m.usage()+fs.FlagUsages())
			return 0
		}
		return m.fail(stderr, "", ctlUsageErr(err.Error()))
	}
	if m.rootlessKit {
		if *showVersion {
			fmt.Fprintf(stdout, "rootlessctl version %s (gonetns %s)\n", rootlessKitVersion, gonetnsVersion())
			return 0
		}
		if fs.NArg() == 0 || fs.Arg(0) == "help" {
			fmt.Fprint(stdout, m.usage()+fs.FlagUsages())
			return 0
		}
	}
	if fs.NArg() == 0 {
		return m.fail(stderr, "", ctlUsageErr("missing COMMAND"))
	}
	name, rest := fs.Arg(0), fs.Args()[1:]
	cmd, ok := ctlCommandNamed(name)
	if !ok {
		return m.fail(stderr, "", ctlUsageErr(fmt.Sprintf("unknown command %q: use list-ports, add-ports, remove-ports or info", name)))
	}
	cf := pflag.NewFlagSet(m.prog+" "+name, pflag.ContinueOnError)
	cf.SetOutput(stderr)
	cf.Usage = func() {}
	jsonOut := new(bool)
	if cmd.json {
		jsonOut = cf.Bool("json", false, "print JSON")
	}
	if m.rootlessKit {
		rest = singleDashLongFlags(cf, rest)
	}
	if err := cf.Parse(rest); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(stdout, "Usage: %s %s\n\n%s\n", m.prog, cmd.synopsis(), cmd.help)
			if cf.HasFlags() {
				fmt.Fprint(stdout, "\nOptions:\n"+cf.FlagUsages())
			}
			return 0
		}
		return m.fail(stderr, "", ctlUsageErr(fmt.Sprintf("%s: %v", name, err)))
	}
	rest = cf.Args()
	if m.rootlessKit && (cmd.args == "") {
		rest = nil
	}
	action, err := cmd.parse(rest)
	if err != nil {
		return m.fail(stderr, name, err)
	}
	path, err := m.socketPath(*socket)
	if err != nil {
		return m.fail(stderr, "", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	if err := action(ctx, api.NewClient(path), ctlOutput{w: stdout, json: *jsonOut, rootlessKit: m.rootlessKit}); err != nil {
		return m.fail(stderr, name, err)
	}
	return 0
}

// fail reports err the mode's way and returns the exit status.
func (m ctlMode) fail(stderr io.Writer, cmd string, err error) int {
	if m.rootlessKit {
		fmt.Fprintf(stderr, "error: %v\n", err)
		return 1
	}
	var usage *ctlUsageError
	if errors.As(err, &usage) {
		fmt.Fprintf(stderr, "%s: %v\nRun '%s --help' for usage.\n", m.prog, err, m.prog)
		return 2
	}
	if cmd != "" {
		fmt.Fprintf(stderr, "%s %s: %v\n", m.prog, cmd, err)
	} else {
		fmt.Fprintf(stderr, "%s: %v\n", m.prog, err)
	}
	return 1
}

// socketPath picks the API socket: --socket, then the state directories
// of the mode's variables.
func (m ctlMode) socketPath(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	for _, env := range m.stateDirEnv {
		if dir := os.Getenv(env); dir != "" {
			return filepath.Join(dir, userns.APISocket), nil
		}
	}
	return "", errors.New(m.noSocket)
}

// usage is the text of --help before the options.
func (m ctlMode) usage() string {
	var b strings.Builder
	if m.rootlessKit {
		b.WriteString("NAME:\n   rootlessctl - RootlessKit API client (gonetns)\n\nUSAGE:\n   rootlessctl [global options] command [command options] [arguments...]\n\nCOMMANDS:\n")
		for _, c := range ctlCommands {
			fmt.Fprintf(&b, "   %-13s %s\n", c.name, c.summary)
		}
		b.WriteString("\nGLOBAL OPTIONS:\n")
		return b.String()
	}
	b.WriteString("Usage: gonetns ctl [--socket PATH] COMMAND [ARGS]\n\nTalks to a running gonetns (or RootlessKit) over its REST API socket.\n\nCommands:\n")
	for _, c := range ctlCommands {
		fmt.Fprintf(&b, "  %-26s %s\n", c.synopsis(), c.short)
		if c.more != "" {
			fmt.Fprintf(&b, "  %-26s %s\n", "", c.more)
		}
	}
	b.WriteString("\nThe socket defaults to $GONETNS_STATE_DIR/api.sock, then\n$ROOTLESSKIT_STATE_DIR/api.sock. 'gonetns ctl COMMAND --help' describes a command.\n\nOptions:\n")
	return b.String()
}
