package main

// The API client commands' actions and their output (ctlcmd.go has the
// command table).

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/port"
)

func ctlListPorts(ctx context.Context, c *api.Client, o ctlOutput) error {
	ports, err := c.ListPorts(ctx)
	if err != nil {
		return err
	}
	w := o.w
	if o.json {
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
	if err := tw.Flush(); err != nil || o.rootlessKit {
		return err
	}
	// gonetns's own: the ports the implicit driver does not publish.
	info, err := c.Info(ctx)
	if err != nil || info.PortDriver == nil || len(info.PortDriver.Unpublished) == 0 {
		return err
	}
	fmt.Fprintln(w, "\nNot published (listening inside, port driver implicit):")
	tw = tabwriter.NewWriter(w, 4, 8, 4, ' ', 0)
	fmt.Fprintln(tw, "PROTO\tPARENTIP\tPARENTPORT\tCHILDIP\tCHILDPORT\tWHY\t")
	for _, u := range info.PortDriver.Unpublished {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%s\t\n", u.Spec.Proto, ctlIP(u.Spec.ParentIP), u.Spec.ParentPort,
			ctlIP(u.Spec.ChildIP), u.Spec.ChildPort, u.Reason)
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
		if nd.Link != "" {
			fmt.Fprintf(w, "  - Link: %s\n", nd.Link)
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
		for _, u := range pd.Unpublished {
			fmt.Fprintf(w, "  - Not published: %s: %s\n", u.Spec, u.Reason)
		}
	}
	if cf := info.Confinement; cf != nil {
		fmt.Fprintf(w, "- Network process confined: landlock %s; seccomp %s\n", cf.Landlock, cf.Seccomp)
	}
	if len(info.Limits) > 0 {
		fmt.Fprintf(w, "- Limits:\n")
		for _, l := range info.Limits {
			fmt.Fprintf(w, "  - %s: %d of %d in use", l.Name, l.InUse, l.Max)
			if l.Peak > 0 {
				fmt.Fprintf(w, " (peak %d)", l.Peak)
			}
			if l.Clients > 0 {
				fmt.Fprintf(w, ", %d clients", l.Clients)
			}
			if l.IdleTimeout != "" {
				fmt.Fprintf(w, ", idle timeout %s", l.IdleTimeout)
			}
			for _, k := range slices.Sorted(maps.Keys(l.Events)) {
				fmt.Fprintf(w, "; %s %d", k, l.Events[k])
			}
			fmt.Fprintln(w)
		}
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
