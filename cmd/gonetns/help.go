package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/port"
)

// The sections of --help, in order.
const (
	sectionNetwork     = "Network"
	sectionPorts       = "Ports"
	sectionEgress      = "Egress"
	sectionNamespaces  = "Namespaces"
	sectionDebugging   = "Debugging"
	sectionRootlessKit = "RootlessKit compatibility"
)

var flagSections = []string{sectionNetwork, sectionPorts, sectionEgress, sectionNamespaces, sectionDebugging, sectionRootlessKit}

const sectionKey = "gonetns/section"

// sectioner returns a function that puts every flag of fs defined since
// its last call (or since sectioner) into the named section.
func sectioner(fs *pflag.FlagSet) func(name string) {
	return func(name string) {
		fs.VisitAll(func(f *pflag.Flag) {
			if _, ok := f.Annotations[sectionKey]; !ok {
				fs.SetAnnotation(f.Name, sectionKey, []string{name})
			}
		})
	}
}

// rootlessKitText is the RootlessKit compatibility section's prose, before
// its flags.
func rootlessKitText() string {
	ignored := make([]string, len(ignoredFlags))
	for i, f := range ignoredFlags {
		ignored[i] = "--" + f.name
	}
	return `Installed as "rootlesskit" (a symlink is enough) gonetns is a drop-in for RootlessKit: its defaults become --net=host --port-driver=none, as RootlessKit's are, and a process the command leaves running lives on. As "rootlessctl" it is RootlessKit's API client, as "rootlesskit-docker-proxy" Docker's userland proxy for RootlessKit. ` +
		`RootlessKit's networks (--net=` + strings.Join(rootlessKitNets, ", ") + `) and port drivers (--port-driver=` + strings.Join(rootlessKitPortDrivers, ", ") + `) select gonetns's own; long flags take one dash too (-net=host). ` +
		`Its flags for the helper programs gonetns does not run are accepted and ignored: ` + strings.Join(ignored, ", ") + "."
}

// examples end --help.
const examples = `Examples:
  # Reach a server on the host's 127.0.0.1:8080 from inside, at 10.0.2.2.
  gonetns curl http://10.0.2.2:8080/

  # Serve inside on port 80, published on the host's port 8080.
  gonetns -p 8080:80 python3 -m http.server 80

  # A shell that can reach the Internet but not the host's private networks.
  gonetns --deny-private --deny-metadata bash
`

// printUsage prints --help: the head, each section's flags, and the
// examples, wrapped to the terminal's width (80 columns when out is not a
// terminal).
func printUsage(out io.Writer, fs *pflag.FlagSet, name string, who personality) {
	width := termWidth(out)
	fmt.Fprintf(out, usageHead, name)
	var visible []*pflag.Flag
	fs.VisitAll(func(f *pflag.Flag) {
		if !f.Hidden {
			visible = append(visible, f)
		}
	})
	col := 0
	for _, f := range visible {
		col = max(col, len(flagLeft(f))+2)
	}
	col = min(col, 34)
	for _, sec := range flagSections {
		fmt.Fprintf(out, "\n%s:\n", sec)
		if text := sectionText(sec, who); text != "" {
			fmt.Fprint(out, wrapText(text, "  ", width))
		}
		for _, f := range visible {
			if a := f.Annotations[sectionKey]; len(a) == 1 && a[0] == sec {
				fmt.Fprint(out, flagUsage(f, col, width))
			}
		}
	}
	fmt.Fprint(out, "\n"+examples)
}

// sectionText is the prose at the head of a section, if it has any.
func sectionText(sec string, who personality) string {
	switch sec {
	case sectionPorts:
		if who == asGonetns {
			return "SPEC is " + port.GrammarDefaultTCP + "; PROTO is tcp (the default), tcp4, tcp6, udp, udp4 or udp6; IPv6 addresses go in brackets: [::1]:8080:[::1]:80/tcp6."
		}
		return "SPEC is " + port.Grammar + "; PROTO is tcp, tcp4, tcp6, udp, udp4 or udp6; IPv6 addresses go in brackets: [::1]:8080:[::1]:80/tcp6."
	case sectionRootlessKit:
		return rootlessKitText()
	}
	return ""
}

// flagLeft is the left column of a flag's line: "  -p, --publish SPEC".
func flagLeft(f *pflag.Flag) string {
	s := "      --" + f.Name
	if f.Shorthand != "" {
		s = "  -" + f.Shorthand + ", --" + f.Name
	}
	if varname, _ := pflag.UnquoteUsage(f); varname != "" {
		s += " " + varname
	}
	return s
}

// flagUsage is a flag's entry: its left column, and its usage with its
// default wrapped into the column from col on (on the next line when the
// left column is wider). A default is never broken across lines.
func flagUsage(f *pflag.Flag, col, width int) string {
	_, usage := pflag.UnquoteUsage(f)
	// The default's spaces are a byte wrapText does not break at until
	// the lines are made.
	const glue = "\x1f"
	if def := flagDefault(f); def != "" {
		usage += " " + strings.ReplaceAll("(default "+def+")", " ", glue)
	}
	left := flagLeft(f)
	body := wrapText(usage, strings.Repeat(" ", col), width)
	body = strings.ReplaceAll(body, glue, " ")
	if len(left)+2 > col {
		return left + "\n" + body
	}
	return left + body[len(left):]
}

// flagDefault is how --help shows a flag's default, "" when it is its
// type's zero value.
func flagDefault(f *pflag.Flag) string {
	switch f.DefValue {
	case "", "false", "0", "[]":
		return ""
	}
	if f.Value.Type() == "string" {
		return strconv.Quote(f.DefValue)
	}
	return f.DefValue
}

// termWidth is the width of the terminal out is, or 80.
func termWidth(out io.Writer) int {
	if f, ok := out.(*os.File); ok {
		if ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ); err == nil && ws.Col >= 40 {
			return int(ws.Col)
		}
	}
	return 80
}

// wrapText fills s into lines of at most width columns, each starting
// with indent.
func wrapText(s, indent string, width int) string {
	var b strings.Builder
	line := indent
	for _, w := range strings.Fields(s) {
		if len(line) > len(indent) && len(line)+1+len(w) > width {
			b.WriteString(line + "\n")
			line = indent
		}
		if len(line) > len(indent) {
			line += " "
		}
		line += w
	}
	if len(line) > len(indent) {
		b.WriteString(line + "\n")
	}
	return b.String()
}

// didYouMean adds the closest flag's name to pflag's "unknown flag: --x".
func didYouMean(err error, fs *pflag.FlagSet) error {
	name, ok := strings.CutPrefix(err.Error(), "unknown flag: --")
	if !ok {
		return err
	}
	name, _, _ = strings.Cut(name, "=")
	// A suggestion differs in at most a third of the name, and 3 edits.
	best, bestD := "", min(3, len(name)/3+1)+1
	fs.VisitAll(func(f *pflag.Flag) {
		if d := editDistance(name, f.Name); !f.Hidden && d < bestD {
			best, bestD = f.Name, d
		}
	})
	if best == "" {
		return err
	}
	return fmt.Errorf("%w (did you mean --%s?)", err, best)
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
