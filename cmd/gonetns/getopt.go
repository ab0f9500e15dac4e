package main

import (
	"fmt"
	"strings"
)

// A command line parser with the rules of glibc's getopt_long, for the
// slirp4netns personality: its callers pass options after the operands
// (slirp4netns -c PID --api-socket PATH tap0), bundle short options (-c6),
// glue values to them (-e3, --mtu=65520) and may abbreviate long options
// (--api for --api-socket). pflag does the first three but neither the
// abbreviations nor getopt's error texts, which callers show.

// getoptOption is one option of the table.
type getoptOption struct {
	long  string // without "--"; "" for a short-only option
	short byte   // 0 for a long-only option
	arg   bool   // takes a value
}

// getoptResult is one option found, with its value, in command-line order.
type getoptResult struct {
	opt   *getoptOption
	value string
}

// getopt parses args (without the program name) against opts. It returns
// the options in order and the operands (arguments that are not options,
// in order; everything after "--" is one). On an error, worded as
// glibc's after "PROG: ", found holds the options before it: as with
// getopt, an option such as --help that ends the program takes effect if
// it comes first.
func getopt(args []string, opts []getoptOption) (found []getoptResult, operands []string, err error) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return found, append(operands, args[i+1:]...), nil
		case strings.HasPrefix(a, "--"):
			name, value, hasValue := strings.Cut(a[2:], "=")
			o, err := lookupLong(opts, name)
			if err != nil {
				return found, nil, err
			}
			switch {
			case o.arg && !hasValue:
				if i+1 >= len(args) {
					return found, nil, fmt.Errorf("option '--%s' requires an argument", o.long)
				}
				i++
				value = args[i]
			case !o.arg && hasValue:
				return found, nil, fmt.Errorf("option '--%s' doesn't allow an argument", o.long)
			}
			found = append(found, getoptResult{opt: o, value: value})
		case strings.HasPrefix(a, "-") && a != "-":
			// One or more short options; the first that takes a value
			// takes the rest of the argument, or the next one.
			for j := 1; j < len(a); j++ {
				o := lookupShort(opts, a[j])
				if o == nil {
					return found, nil, fmt.Errorf("invalid option -- '%c'", a[j])
				}
				if !o.arg {
					found = append(found, getoptResult{opt: o})
					continue
				}
				value := a[j+1:]
				if value == "" {
					if i+1 >= len(args) {
						return found, nil, fmt.Errorf("option requires an argument -- '%c'", o.short)
					}
					i++
					value = args[i]
				}
				found = append(found, getoptResult{opt: o, value: value})
				break
			}
		default:
			operands = append(operands, a)
		}
	}
	return found, operands, nil
}

func lookupShort(opts []getoptOption, c byte) *getoptOption {
	for i := range opts {
		if opts[i].short == c {
			return &opts[i]
		}
	}
	return nil
}

// lookupLong finds a long option by its name or an unambiguous prefix of
// it.
func lookupLong(opts []getoptOption, name string) (*getoptOption, error) {
	var matches []*getoptOption
	for i := range opts {
		o := &opts[i]
		if o.long == "" {
			continue
		}
		if o.long == name {
			return o, nil
		}
		if name != "" && strings.HasPrefix(o.long, name) {
			matches = append(matches, o)
		}
	}
	switch len(matches) {
	case 0:
		return nil, fmt.Errorf("unrecognized option '--%s'", name)
	case 1:
		return matches[0], nil
	}
	var names []string
	for _, o := range matches {
		names = append(names, "'--"+o.long+"'")
	}
	return nil, fmt.Errorf("option '--%s' is ambiguous; possibilities: %s", name, strings.Join(names, " "))
}
