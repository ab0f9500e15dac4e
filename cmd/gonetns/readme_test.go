package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// otherFlags are the long flags the documentation names that belong to
// other programs, with the program.
var otherFlags = map[string]string{
	"storage-driver":       "dockerd",
	"device":               "docker run",
	"security-opt":         "docker run",
	"privileged":           "docker run",
	"restart":              "docker run",
	"preserve-credentials": "nsenter",
	"mount-proc":           "unshare",
	"add-subuids":          "usermod",
	"add-subgids":          "usermod",
	"bind":                 "python3 -m http.server",
	"config-net":           "pasta",
	"runas":                "pasta",
	"outbound-if4":         "pasta",
	"outbound-if6":         "pasta",
	"network":              "podman run",
	"call-graph":           "perf record",
}

// docFlag finds long flags in prose and command lines: --name, not
// inside a longer word.
var docFlag = regexp.MustCompile(`(^|[^\w-])--([a-z][a-z0-9-]*[a-z0-9])`)

// The README and the documentation name only flags that --help has (as
// gonetns, as rootlesskit, or gonetns ctl's), so that neither drifts from
// the other: renaming or removing a flag fails here until the
// documentation follows. A family written with a trailing dash
// (--slirp4netns-*) must prefix some flag.
func TestDocumentedFlagsExist(t *testing.T) {
	known := map[string]bool{}
	for _, who := range []personality{asGonetns, asRootlessKit} {
		fs, _ := defineFlags(&options{}, who, "gonetns", io.Discard)
		fs.VisitAll(func(f *pflag.Flag) { known[f.Name] = true })
	}
	known["socket"], known["json"] = true, true // gonetns ctl, rootlessctl
	for _, o := range slirpOptionTable {        // the slirp4netns personality
		known[o.long] = true
	}
	for name, prog := range otherFlags {
		if known[name] {
			t.Errorf("--%s is listed as %s's, but it is a flag of gonetns: take it out of otherFlags", name, prog)
		}
	}
	docs, err := filepath.Glob("../../docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	docs = append(docs, "../../README.md", "../../bench/README.md")
	var all []string
	for name := range known {
		all = append(all, name)
	}
	for _, path := range docs {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(b), "\n") {
			for _, m := range docFlag.FindAllStringSubmatchIndex(line, -1) {
				name := line[m[4]:m[5]]
				family := m[5] < len(line) && line[m[5]] == '-'
				switch {
				case known[name], otherFlags[name] != "":
				case family && slices.ContainsFunc(all, func(f string) bool { return strings.HasPrefix(f, name+"-") }):
				default:
					t.Errorf("%s:%d names --%s, which is no flag of gonetns (--help): fix the documentation, or add the flag to otherFlags in readme_test.go if it is another program's (or to known above, for another personality of gonetns): %s",
						filepath.Base(path), i+1, name, strings.TrimSpace(line))
				}
			}
		}
	}
}

// The README's quick start and examples run gonetns with flags --help
// shows, and the help's examples are valid command lines.
func TestHelpExamplesParse(t *testing.T) {
	var out strings.Builder
	if _, err := parseFlags([]string{"--help"}, asGonetns, "gonetns", &out, slog.New(slog.DiscardHandler)); err != errHelpShown {
		t.Fatal(err)
	}
	_, ex, ok := strings.Cut(out.String(), "\nExamples:\n")
	if !ok {
		t.Fatal("--help has no examples")
	}
	n := 0
	for _, line := range strings.Split(ex, "\n") {
		args, ok := strings.CutPrefix(strings.TrimSpace(line), "gonetns ")
		if !ok {
			continue
		}
		n++
		if _, err := parseFlags(strings.Fields(args), asGonetns, "gonetns", io.Discard, slog.New(slog.DiscardHandler)); err != nil {
			t.Errorf("--help's example %q: %v", line, err)
		}
	}
	if n < 2 {
		t.Errorf("--help has %d examples, want at least 2", n)
	}
	// And the README's: every gonetns command line of its code blocks
	// parses (the flags exist, their values are valid together).
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	n = 0
	for _, line := range strings.Split(string(b), "\n") {
		line, _, _ = strings.Cut(strings.TrimSpace(line), "#")
		args, ok := strings.CutPrefix(line, "gonetns ")
		if !ok {
			args, ok = strings.CutPrefix(line, "bin/gonetns ")
		}
		if !ok || strings.HasPrefix(args, "[") || strings.HasPrefix(args, "ctl ") {
			continue
		}
		n++
		if _, err := parseFlags(strings.Fields(args), asGonetns, "gonetns", io.Discard, slog.New(slog.DiscardHandler)); err != nil && err != errHelpShown {
			t.Errorf("README's %q: %v", line, err)
		}
	}
	if n < 5 {
		t.Errorf("%d gonetns command lines in the README, want the quick start's and the examples'", n)
	}
}
