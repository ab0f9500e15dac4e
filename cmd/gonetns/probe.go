//go:build !e2ehooks

package main

import (
	"log/slog"

	"github.com/gonetns/gonetns/sandbox"
)

// afterStart does nothing outside the end-to-end tests' build.
func afterStart(*sandbox.Sandbox, *slog.Logger) {}
