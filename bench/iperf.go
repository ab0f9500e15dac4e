package main

import (
	"encoding/json"
	"errors"
	"fmt"
)

// iperfRun is what the harness keeps of one iperf3 --json run.
type iperfRun struct {
	Bytes       float64   `json:"bytes"`   // received by the receiving end
	Seconds     float64   `json:"seconds"` // of the receiving end's measurement
	BitsPerSec  float64   `json:"bits_per_second"`
	SentBytes   float64   `json:"sent_bytes"`
	Retransmits float64   `json:"retransmits"`
	IntervalsG  []float64 `json:"intervals_gbps"` // per-second throughput, for drift and stalls
	// UDP only: datagrams the receiver counted as lost, of those sent.
	LostPackets float64 `json:"lost_packets,omitempty"`
	Packets     float64 `json:"packets,omitempty"`
	LostPercent float64 `json:"lost_percent,omitempty"`
}

// parseIperf reads the parts of iperf3 --json output the harness uses:
// end.sum_received (bytes, seconds, bits_per_second), end.sum_sent (bytes,
// retransmits) and the intervals. An "error" member is iperf3's failure.
func parseIperf(b []byte) (iperfRun, error) {
	var doc struct {
		Error     string `json:"error"`
		Intervals []struct {
			Sum struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum"`
		} `json:"intervals"`
		End struct {
			SumSent struct {
				Bytes       float64 `json:"bytes"`
				Retransmits float64 `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived *struct {
				Seconds       float64 `json:"seconds"`
				Bytes         float64 `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
				LostPackets   float64 `json:"lost_packets"`
				Packets       float64 `json:"packets"`
				LostPercent   float64 `json:"lost_percent"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return iperfRun{}, fmt.Errorf("iperf3 output is not JSON: %w", err)
	}
	if doc.Error != "" {
		return iperfRun{}, errors.New("iperf3: " + doc.Error)
	}
	r := doc.End.SumReceived
	if r == nil || r.Seconds <= 0 || r.Bytes <= 0 {
		return iperfRun{}, errors.New("iperf3 reported no data received")
	}
	run := iperfRun{
		Bytes:       r.Bytes,
		Seconds:     r.Seconds,
		BitsPerSec:  r.BitsPerSecond,
		SentBytes:   doc.End.SumSent.Bytes,
		Retransmits: doc.End.SumSent.Retransmits,
		LostPackets: r.LostPackets,
		Packets:     r.Packets,
		LostPercent: r.LostPercent,
	}
	for _, iv := range doc.Intervals {
		run.IntervalsG = append(run.IntervalsG, round3(iv.Sum.BitsPerSecond/1e9))
	}
	return run, nil
}
