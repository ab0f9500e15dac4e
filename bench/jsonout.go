package main

import (
	"encoding/json"
	"time"
)

// jsonSchema is bumped when the JSON's meaning changes.
const jsonSchema = 1

type jsonResults struct {
	Schema      int           `json:"schema"`
	Started     time.Time     `json:"started"`
	Finished    time.Time     `json:"finished"`
	Interrupted bool          `json:"interrupted,omitempty"`
	Config      jsonConfig    `json:"config"`
	Machine     machine       `json:"machine"`
	Systems     []jsonSystem  `json:"systems"`
	Summary     []jsonSummary `json:"summary"`
	Samples     []sample      `json:"samples"`
	Faults      []string      `json:"harness_errors,omitempty"`
}

type jsonConfig struct {
	Seconds      int   `json:"seconds"`
	Runs         int   `json:"runs"`
	MTUs         []int `json:"mtus"`
	Quick        bool  `json:"quick"`
	PortMTU      int   `json:"port_mtu"`
	RRWarmup     int   `json:"rr_warmup"`
	RRRounds     int   `json:"rr_rounds"`
	ConnForMS    int64 `json:"conn_for_ms"`
	ConnMax      int   `json:"conn_max"`
	UDPWarmup    int   `json:"udp_warmup"`
	UDPRounds    int   `json:"udp_rounds"`
	StartupCount int   `json:"startup_count"`
}

type jsonSystem struct {
	Name      string `json:"name"`
	Label     string `json:"label"`
	Reference bool   `json:"reference,omitempty"`
	Port      bool   `json:"published_port,omitempty"`
	Available bool   `json:"available"`
	Reason    string `json:"reason,omitempty"`
	Install   string `json:"install,omitempty"`
	Version   string `json:"version,omitempty"`
	NetProc   string `json:"network_process,omitempty"`
}

// jsonSummary is one figure of the tables, for readers that do not want
// to aggregate the samples themselves.
type jsonSummary struct {
	System      string  `json:"system"`
	MTU         int     `json:"mtu,omitempty"`
	Measurement string  `json:"measurement"`
	Value       string  `json:"value"`
	Unit        string  `json:"unit"`
	Higher      bool    `json:"higher_is_better"`
	Runs        int     `json:"runs"`
	Failed      int     `json:"failed"`
	Summary     summary `json:"summary"`
}

func marshalResults(r *results) ([]byte, error) {
	c := r.cfg
	out := jsonResults{
		Schema: jsonSchema, Started: r.started.UTC(), Finished: r.finished.UTC(), Interrupted: r.interrupted,
		Config: jsonConfig{
			Seconds: c.seconds, Runs: c.runs, MTUs: c.mtus, Quick: c.quick, PortMTU: r.portMTU(),
			RRWarmup: c.rrWarmup, RRRounds: c.rrRounds, ConnForMS: c.connFor.Milliseconds(), ConnMax: c.connMax,
			UDPWarmup: c.udpWarmup, UDPRounds: c.udpRounds, StartupCount: c.startupCount,
		},
		Machine: r.machine,
		Samples: r.samples,
		Faults:  r.faults,
	}
	for _, s := range r.systems {
		if !c.wants(s.name) {
			continue
		}
		out.Systems = append(out.Systems, jsonSystem{
			Name: s.name, Label: s.label, Reference: s.ref, Port: s.port, Available: s.available,
			Reason: s.reason, Install: s.install, Version: s.version, NetProc: s.netName,
		})
		var ms []metric
		mtus := c.mtus
		switch {
		case s.port:
			ms, mtus = portMetrics, []int{r.portMTU()}
		case s.ref:
			ms, mtus = mtuMetrics, []int{0}
		default:
			ms = mtuMetrics
		}
		for _, mtu := range mtus {
			for _, m := range ms {
				cl := r.cell(s.name, mtu, m.kind, m.key)
				if cl.runs == 0 {
					continue
				}
				out.Summary = append(out.Summary, jsonSummary{
					System: s.name, MTU: mtu, Measurement: m.kind, Value: m.key, Unit: m.unit, Higher: m.higher,
					Runs: cl.runs, Failed: cl.failed, Summary: cl.summary,
				})
			}
		}
	}
	if out.Samples == nil {
		out.Samples = []sample{}
	}
	return json.MarshalIndent(out, "", "  ")
}
