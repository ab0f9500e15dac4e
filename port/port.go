// Package port is the vocabulary of publishing ports, apart from every
// driver that publishes them (RootlessKit's pkg/port): the publish Spec and
// its grammar (ParseSpec), the Status of a published port, the errors a
// caller branches on, and the Manager interface that the port drivers
// (package portfwd's builtin driver, package implicit) implement and the
// REST API (package api) serves.
package port

import (
	"context"
	"errors"
)

// Errors a caller may branch on (errors.Is); the API maps them to HTTP
// status codes: ErrInvalidSpec to 400, ErrConflict to 409, ErrUnknownPort
// to 404. Listen errors also keep their errno (syscall.EADDRINUSE,
// syscall.EACCES, ...).
var (
	// ErrConflict: the spec overlaps a port the Manager publishes already.
	ErrConflict = errors.New("port already published")
	// ErrUnknownPort: no published port has that ID.
	ErrUnknownPort = errors.New("unknown port ID")
)

// Manager publishes ports. Its errors wrap ErrInvalidSpec, ErrConflict and
// ErrUnknownPort where they apply. Implementations are safe for concurrent
// use.
type Manager interface {
	// AddPort validates spec and publishes it; ctx bounds the listen.
	AddPort(ctx context.Context, spec Spec) (Status, error)
	// RemovePort stops publishing port id.
	RemovePort(id int) error
	// ListPorts returns the published ports, sorted by ID (never nil).
	ListPorts() []Status
}
