package main

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"
)

// logHandler prints records for people: "gonetns: warning: message k=v".
// With debug on, records carry a timestamp and the debug level is shown.
type logHandler struct {
	mu     *sync.Mutex
	w      io.Writer
	level  slog.Level
	prefix string
	attrs  []groupedAttr // from WithAttrs, formatted only when a record is
	group  string        // key prefix from WithGroup, "a.b."
}

type groupedAttr struct {
	group string
	attr  slog.Attr
}

func newLogger(w io.Writer, debug bool, prefix string) *slog.Logger {
	level := slog.LevelInfo
	if debug {
		level = slog.LevelDebug
	}
	return slog.New(&logHandler{mu: &sync.Mutex{}, w: w, level: level, prefix: prefix})
}

// logClock is the time of day --debug's lines start with.
const logClock = "15:04:05.000"

func (h *logHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level }

func (h *logHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	if h.level <= slog.LevelDebug {
		b.WriteString(r.Time.Format(logClock + " "))
	}
	b.WriteString(h.prefix)
	switch {
	case r.Level >= slog.LevelError:
		b.WriteString("error: ")
	case r.Level >= slog.LevelWarn:
		b.WriteString("warning: ")
	case r.Level < slog.LevelInfo:
		b.WriteString("debug: ")
	}
	b.WriteString(strings.ReplaceAll(r.Message, "\n", "\n  "))
	for _, ga := range h.attrs {
		writeAttr(&b, ga.group, ga.attr)
	}
	r.Attrs(func(a slog.Attr) bool {
		writeAttr(&b, strings.TrimSuffix(h.group, "."), a)
		return true
	})
	b.WriteByte('\n')
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := io.WriteString(h.w, b.String())
	return err
}

func writeAttr(b *strings.Builder, group string, a slog.Attr) {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return
	}
	key := a.Key
	if group != "" {
		key = group + "." + key
	}
	if a.Value.Kind() == slog.KindGroup {
		for _, ga := range a.Value.Group() {
			writeAttr(b, key, ga)
		}
		return
	}
	v := a.Value.String()
	if a.Value.Kind() == slog.KindDuration {
		v = a.Value.Duration().Round(time.Microsecond).String()
	}
	if v == "" || strings.ContainsFunc(v, func(r rune) bool { return r <= ' ' || r == '"' || r == '=' || r == 0x7f }) {
		// Quoted, so that text from the sandbox (a host name, an error)
		// cannot forge a log line with a newline.
		v = strconv.Quote(v)
	}
	b.WriteString(" " + key + "=" + v)
}

// WithAttrs keeps the attributes; they are formatted only if a record is
// actually written (a logger With'ed per connection costs little when
// debug is off).
func (h *logHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = make([]groupedAttr, len(h.attrs), len(h.attrs)+len(as))
	copy(c.attrs, h.attrs)
	for _, a := range as {
		c.attrs = append(c.attrs, groupedAttr{strings.TrimSuffix(h.group, "."), a})
	}
	return &c
}

// WithGroup qualifies the keys of later attributes: group.key=value.
func (h *logHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.group += name + "."
	return &c
}
