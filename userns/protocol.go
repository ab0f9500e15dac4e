package userns

import (
	"encoding/json"
)

// Environment variables of the re-executed child. They are internal: the
// command never sees them.
const (
	envStage    = "_GONETNS_CHILD_STAGE"
	stageFirst  = "1"    // waits for the id maps, then re-executes itself
	stageSecond = "2"    // has capabilities in the namespace; sets everything up
	stageInit   = "init" // PID 1 of a new PID namespace: mounts /proc, execs the command
	stageJoin   = "join" // in namespaces someone else made: sets up the link there (Join)
	envInitPath = "_GONETNS_INIT_PATH"
	// envInitSupervise makes the init stage run the command as its child
	// (Options.InitProcess) instead of becoming it.
	envInitSupervise = "_GONETNS_INIT_SUPERVISE"
)

// ctlFD is the child's descriptor of the control socket; ExtraFiles follow.
const ctlFD = 3

// Message types on the control channel.
const (
	// parent -> child
	msgProceed = "proceed"  // the id maps are written: re-execute to gain capabilities
	msgConfig  = "config"   // childConfig for the second stage
	msgStart   = "start"    // the parent is ready: run the command
	msgSignal  = "signal"   // deliver Signal to the command
	msgDoneAck = "done-ack" // the parent lives: what the command left may live on (LeaveOrphans)
	// child -> parent
	msgNetwork = "network" // namespaces and mounts are set up; Info and files of the network hook
	msgStarted = "started" // the command runs as PID
	msgExited  = "exited"  // the command was ended by Signal
	msgDone    = "done"    // the command exited by itself (LeaveOrphans): may its leftovers live on?
	msgError   = "error"   // setup failed with Error; the child exits next
)

type message struct {
	Type   string          `json:"type"`
	Config *childConfig    `json:"config,omitempty"`
	Signal int             `json:"signal,omitempty"`
	PID    int             `json:"pid,omitempty"`
	Error  string          `json:"error,omitempty"`
	Info   json.RawMessage `json:"info,omitempty"`
}

// childConfig is everything the second stage needs, sent over the control
// channel rather than on the command line.
type childConfig struct {
	// The command is either ArgvFrom, an index into the child's own
	// os.Args (it is re-executed with the parent's argv, of which the
	// command is the tail: no size limit), or Args when it is not.
	ArgvFrom    int      `json:"argvFrom,omitempty"`
	Args        []string `json:"args,omitempty"`
	Env         []string `json:"env"`
	StateDir    string   `json:"stateDir"`
	NewNet      bool     `json:"newNet"`
	PIDNS       bool     `json:"pidns"`
	InitProcess bool     `json:"initProcess,omitempty"`
	KillOrphans bool     `json:"killOrphans"`
	// Cgroup2 mounts a cgroup2 of the command's cgroup namespace on
	// /sys/fs/cgroup (--evacuate-cgroup2 with --cgroupns).
	Cgroup2     bool            `json:"cgroup2,omitempty"`
	Propagation string          `json:"propagation"`
	CopyUp      []string        `json:"copyUp"`
	DNSFiles    bool            `json:"dnsFiles"`
	Network     json.RawMessage `json:"network,omitempty"`
	ExtraFiles  int             `json:"extraFiles"`
	Debug       bool            `json:"debug"`
}
