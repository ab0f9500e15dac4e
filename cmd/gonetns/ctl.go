package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/port"
)

const ctlUsage = `Usage: gonetns ctl [--socket PATH] COMMAND [ARGS]

Talks to a running gonetns (or RootlessKit) over its REST API socket.

Commands:
  list-ports [--json]        list the published ports
  add-ports [--json] SPEC... publish ports; SPEC is ` + port.Grammar + `
                             e.g. 8080:80/tcp, 127.0.0.1:8080:80/tcp, [::1]:8080:[::1]:80/tcp6
  remove-ports ID...         unpublish ports by the ID list-ports shows
  info [--json]              show the API, state directory, child PID and drivers

The socket defaults to $GONETNS_STATE_DIR/api.sock, then
$ROOTLESSKIT_STATE_DIR/api.sock. 'gonetns ctl COMMAND --help' describes a command.

Options:
`

// ctlTimeout bounds one ctl invocation's API calls.
const ctlTimeout = 30 * time.Second

// runCtl runs `gonetns ctl ARGS...` (args exclude "ctl") and returns the
// exit status: 0 success, 1 failure, 2 bad usage.
func runCtl(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("gonetns ctl", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {}
	fs.SetInterspersed(false) // flags after COMMAND are the command's
	socket := fs.String("socket", "", "path to the API socket (api.sock in the state directory)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, ctlUsage+fs.FlagUsages())
			return 0
		}
		return ctlUsageError(stderr, err)
	}
	if fs.NArg() == 0 {
		return ctlUsageError(stderr, errors.New("missing COMMAND"))
	}
	cmd, cmdArgs := fs.Arg(0), fs.Args()[1:]
	usage, ok := ctlCommandUsage[cmd]
	if !ok {
		return ctlUsageError(stderr, fmt.Errorf("unknown command %q", cmd))
	}
	cmdFlags := pflag.NewFlagSet("gonetns ctl "+cmd, pflag.ContinueOnError)
	cmdFlags.SetOutput(stderr)
	cmdFlags.Usage = func() {}
	jsonOut := new(bool)
	if cmd != "remove-ports" {
		jsonOut = cmdFlags.Bool("json", false, "print JSON")
	}
	if err := cmdFlags.Parse(cmdArgs); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, usage)
			if cmdFlags.HasFlags() {
				fmt.Fprint(stdout, "\nOptions:\n"+cmdFlags.FlagUsages())
			}
			return 0
		}
		return ctlUsageError(stderr, fmt.Errorf("%s: %w", cmd, err))
	}
	rest := cmdFlags.Args()

	// Check the arguments before looking for the server.
	var action func(ctx context.Context, c *api.Client) error
	switch cmd {
	case "list-ports", "info":
		if len(rest) > 0 {
			return ctlUsageError(stderr, fmt.Errorf("%s takes no arguments, got %q", cmd, rest))
		}
		action = func(ctx context.Context, c *api.Client) error {
			if cmd == "info" {
				return ctlInfo(ctx, c, *jsonOut, false, stdout)
			}
			return ctlListPorts(ctx, c, *jsonOut, stdout)
		}
	case "add-ports":
		if len(rest) == 0 {
			return ctlUsageError(stderr, errors.New("add-ports: no SPEC given, e.g. 127.0.0.1:8080:80/tcp"))
		}
		// All specs are checked before any is published.
		specs := make([]port.Spec, 0, len(rest))
		for _, a := range rest {
			s, err := port.ParseSpec(a)
			if err != nil {
				fmt.Fprintf(stderr, "gonetns ctl add-ports: %v\n", err)
				return 1
			}
			specs = append(specs, s)
		}
		action = func(ctx context.Context, c *api.Client) error {
			return ctlAddPorts(ctx, c, specs, *jsonOut, stdout)
		}
	case "remove-ports":
		if len(rest) == 0 {
			return ctlUsageError(stderr, errors.New("remove-ports: no ID given (see list-ports)"))
		}
		ids := make([]int, 0, len(rest))
		for _, a := range rest {
			id, err := strconv.Atoi(a)
			if err != nil || id < 1 {
				fmt.Fprintf(stderr, "gonetns ctl remove-ports: bad port ID %q: want the number list-ports shows\n", a)
				return 1
			}
			ids = append(ids, id)
		}
		action = func(ctx context.Context, c *api.Client) error {
			return ctlRemovePorts(ctx, c, ids, stdout)
		}
	}

	path, err := ctlSocketPath(*socket)
	if err != nil {
		fmt.Fprintf(stderr, "gonetns ctl: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	if err := action(ctx, api.NewClient(path)); err != nil {
		fmt.Fprintf(stderr, "gonetns ctl %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

// ctlCommandUsage is each command's --help.
var ctlCommandUsage = map[string]string{
	"list-ports": "Usage: gonetns ctl list-ports [--json]\n\nLists the published ports: a table, or one JSON object per line with --json.\n",
	"add-ports": "Usage: gonetns ctl add-ports [--json] SPEC...\n\nPublishes ports and prints each new ID (the status as JSON with --json).\nSPEC is " +
		port.Grammar + ", PROTO one of " + strings.Join(port.Protos, ", ") +
		",\nIPv6 addresses in brackets: 8080:80/tcp, 127.0.0.1:8080:80/tcp, [::1]:8080:[::1]:80/tcp6.\n",
	"remove-ports": "Usage: gonetns ctl remove-ports ID...\n\nUnpublishes ports by the ID list-ports shows and prints each removed ID.\n",
	"info":         "Usage: gonetns ctl info [--json]\n\nShows the API version, state directory, child PID and drivers.\n",
}

func ctlUsageError(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "gonetns ctl: %v\nRun 'gonetns ctl --help' for usage.\n", err)
	return 2
}

// ctlSocketPath picks the API socket: --socket, then the state directory
// of gonetns, then RootlessKit's.
func ctlSocketPath(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	for _, env := range []string{"GONETNS_STATE_DIR", "ROOTLESSKIT_STATE_DIR"} {
		if dir := os.Getenv(env); dir != "" {
			return filepath.Join(dir, "api.sock"), nil
		}
	}
	return "", errors.New("no API socket: pass --socket PATH, or set $GONETNS_STATE_DIR (gonetns sets it for the command it runs) or $ROOTLESSKIT_STATE_DIR")
}

func ctlListPorts(ctx context.Context, c *api.Client, jsonOut bool, w io.Writer) error {
	ports, err := c.ListPorts(ctx)
	if err != nil {
		return err
	}
	if jsonOut {
		// One object per line, as rootlessctl prints them.
		for _, p := range ports {
			if err := ctlPrintJSON(w, p); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(w, 4, 8, 4, ' ', 0)
	fmt.Fprintln(tw, "ID\tPROTO\tPARENTIP\tPARENTPORT\tCHILDIP\tCHILDPORT\t")
	for _, p := range ports {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%d\t\n", p.ID, p.Spec.Proto, ctlIP(p.Spec.ParentIP),
			p.Spec.ParentPort, ctlIP(p.Spec.ChildIP), p.Spec.ChildPort)
	}
	return tw.Flush()
}

// ctlIP shows an omitted address as rootlessctl does: empty.
func ctlIP(ip netip.Addr) string {
	if !ip.IsValid() {
		return ""
	}
	return ip.String()
}

func ctlAddPorts(ctx context.Context, c *api.Client, specs []port.Spec, jsonOut bool, w io.Writer) error {
	for _, s := range specs {
		st, err := c.AddPort(ctx, s)
		if err != nil {
			return err
		}
		if jsonOut {
			if err := ctlPrintJSON(w, st); err != nil {
				return err
			}
		} else {
			fmt.Fprintf(w, "%d\n", st.ID)
		}
	}
	return nil
}

func ctlRemovePorts(ctx context.Context, c *api.Client, ids []int, w io.Writer) error {
	for _, id := range ids {
		if err := c.RemovePort(ctx, id); err != nil {
			return err
		}
		fmt.Fprintf(w, "%d\n", id)
	}
	return nil
}

// ctlInfo prints GET /v1/info. With rootlessKitOnly (rootlessctl), only
// RootlessKit's own fields are shown, exactly as RootlessKit's rootlessctl
// shows them (it drops what it does not know): scripts compare them.
func ctlInfo(ctx context.Context, c *api.Client, jsonOut, rootlessKitOnly bool, w io.Writer) error {
	info, err := c.Info(ctx)
	if err != nil {
		return err
	}
	if rootlessKitOnly {
		info = info.RootlessKitFields()
	}
	if jsonOut {
		b, err := json.MarshalIndent(info, "", "    ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(w, string(b))
		return err
	}
	fmt.Fprintf(w, "- REST API version: %s\n", info.APIVersion)
	fmt.Fprintf(w, "- Implementation version: %s\n", info.Version)
	fmt.Fprintf(w, "- State Directory: %s\n", info.StateDir)
	fmt.Fprintf(w, "- Child PID: %d\n", info.ChildPID)
	if nd := info.NetworkDriver; nd != nil {
		fmt.Fprintf(w, "- Network Driver: %s\n", nd.Driver)
		fmt.Fprintf(w, "  - DNS: %v\n", nd.DNS)
		if nd.ChildIP.IsValid() {
			fmt.Fprintf(w, "  - IP: %v\n", nd.ChildIP)
		}
		if e := nd.Egress; e != nil && len(e.Rules) > 0 {
			rules := make([]string, len(e.Rules))
			for i, r := range e.Rules {
				rules[i] = r.Action + " " + r.Prefix.String()
			}
			fmt.Fprintf(w, "  - Egress: %s; otherwise %s\n", strings.Join(rules, ", "), e.Default)
		}
	}
	if pd := info.PortDriver; pd != nil {
		fmt.Fprintf(w, "- Port Driver: %s\n", pd.Driver)
		fmt.Fprintf(w, "  - Supported protocols: %v\n", pd.Protos)
	}
	return nil
}

func ctlPrintJSON(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}
