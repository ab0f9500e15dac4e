package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func TestLogHandler(t *testing.T) {
	var buf bytes.Buffer
	log := newLogger(&buf, false, "gonetns: ")
	log.Debug("hidden")
	log.Info("plain", "n", 3)
	log.Warn("careful", "name", "evil\ngonetns: error: forged", "empty", "")
	log.WithGroup("dns").Error("failed", "upstream", "127.0.0.53:53")
	got := buf.String()
	want := "gonetns: plain n=3\n" +
		"gonetns: warning: careful name=\"evil\\ngonetns: error: forged\" empty=\"\"\n" +
		"gonetns: error: failed dns.upstream=127.0.0.53:53\n"
	if got != want {
		t.Errorf("log output:\n%s\nwant:\n%s", got, want)
	}
	buf.Reset()
	newLogger(&buf, true, "x: ").With(slog.Group("g", "k", 1)).Debug("shown")
	if !strings.HasSuffix(buf.String(), "x: debug: shown g.k=1\n") {
		t.Errorf("debug output %q", buf.String())
	}
}
