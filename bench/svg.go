package main

import (
	"bytes"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// The chart: a grouped bar chart of TCP throughput, one panel per
// direction, a group of bars per MTU and a bar per system (the median,
// with a min–max whisker and its value on top), host loopback as a dashed
// line. Hand-written SVG that reads on its own: title, subtitle with the
// machine, axes with units, legend.

const (
	svgWidth   = 1000
	svgPanelH  = 300
	svgLeft    = 80
	svgRight   = 30
	svgTop     = 110 // title, subtitle, legend
	svgPanelGp = 80  // between panels: x labels and the next panel's title
)

var seriesColors = map[string]string{
	"gonetns":          "#1f77b4",
	"gonetns-packet":   "#17becf",
	"gonetns-netstack": "#9467bd",
	"slirp4netns":      "#ff7f0e",
	"pasta":            "#2ca02c",
	"gvisor-tap-vsock": "#9467bd",
}

func colorOf(name string) string {
	if c, ok := seriesColors[name]; ok {
		return c
	}
	return "#8c564b"
}

// renderSVG draws the throughput chart of r.
func renderSVG(r *results) []byte {
	subject, peers := r.columns(false)
	var series []*system
	if subject != nil {
		series = append(series, subject)
	}
	series = append(series, peers...)
	panels := []struct{ kind, title string }{
		{kindC2H, "sandbox → host (iperf3 client in the sandbox sends to 127.0.0.1 on the host)"},
		{kindH2C, "host → sandbox (iperf3 -R: the host sends)"},
	}
	height := svgTop + len(panels)*(svgPanelH+svgPanelGp) + 20

	// One scale for both panels, so bars compare across them.
	top := 0.0
	for _, p := range panels {
		for _, s := range series {
			for _, mtu := range r.cfg.mtus {
				if c := r.cell(s.name, mtu, p.kind, "gbps"); c.ok() {
					top = math.Max(top, c.Max)
				}
			}
		}
		if c := r.cell("host", 0, p.kind, "gbps"); c.ok() {
			top = math.Max(top, c.Median)
		}
	}
	yMax, step := niceScale(top * 1.12)

	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">`+"\n",
		svgWidth, height, svgWidth, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="#ffffff"/>`+"\n")
	text(&b, svgWidth/2, 28, 20, "middle", "bold", "Single-stream TCP throughput: gonetns vs slirp4netns, pasta and RootlessKit")
	text(&b, svgWidth/2, 50, 12, "middle", "", fmt.Sprintf("iperf3, %d s per run; bars: median of %d run(s), whiskers: min–max. %s, %s, %d CPUs, kernel %s, %s UTC",
		r.cfg.seconds, r.cfg.runs, r.machine.Host, r.machine.CPU, r.machine.NProc, r.machine.Kernel, r.started.UTC().Format("2006-01-02 15:04")))

	// Legend.
	x := float64(svgLeft)
	for _, s := range series {
		fmt.Fprintf(&b, `<rect x="%.1f" y="68" width="14" height="14" fill="%s"/>`+"\n", x, colorOf(s.name))
		text(&b, x+20, 80, 13, "start", "", s.label)
		x += 30 + 7.2*float64(len([]rune(s.label)))
	}
	if r.ran("host") {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="75" x2="%.1f" y2="75" stroke="#555" stroke-width="2" stroke-dasharray="6,4"/>`+"\n", x, x+28)
		text(&b, x+34, 80, 13, "start", "", "host loopback, no namespace (ceiling)")
	}

	for i, p := range panels {
		y0 := float64(svgTop + i*(svgPanelH+svgPanelGp) + 20) // top of the plot
		drawPanel(&b, r, series, p.kind, p.title, y0, yMax, step)
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

func drawPanel(b *bytes.Buffer, r *results, series []*system, kind, title string, y0, yMax, step float64) {
	plotW := float64(svgWidth - svgLeft - svgRight)
	h := float64(svgPanelH)
	yOf := func(v float64) float64 { return y0 + h - v/yMax*h }
	text(b, svgLeft, y0-8, 14, "start", "bold", title)

	// Grid and y axis.
	for v := 0.0; v <= yMax+step/2; v += step {
		y := yOf(v)
		fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e0e0e0"/>`+"\n", svgLeft, y, svgLeft+plotW, y)
		text(b, svgLeft-6, y+4, 11, "end", "", strconv.FormatFloat(v, 'g', 4, 64))
	}
	fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#333"/>`+"\n", svgLeft, y0, svgLeft, y0+h)
	fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#333"/>`+"\n", svgLeft, y0+h, svgLeft+plotW, y0+h)
	cy := y0 + h/2
	fmt.Fprintf(b, `<text x="%d" y="%.1f" font-size="12" text-anchor="middle" transform="rotate(-90 %d %.1f)">throughput, Gbit/s</text>`+"\n", svgLeft-50, cy, svgLeft-50, cy)

	// Bars.
	groups := len(r.cfg.mtus)
	groupW := plotW / float64(max(groups, 1))
	n := max(len(series), 1)
	barW := min(groupW*0.8/float64(n), 90)
	for gi, mtu := range r.cfg.mtus {
		gx := float64(svgLeft) + (float64(gi)+0.5)*groupW - barW*float64(n)/2
		text(b, float64(svgLeft)+(float64(gi)+0.5)*groupW, y0+h+18, 12, "middle", "", fmt.Sprintf("MTU %d", mtu))
		for si, s := range series {
			c := r.cell(s.name, mtu, kind, "gbps")
			x := gx + float64(si)*barW
			mid := x + barW/2
			if !c.ok() {
				label := "–"
				if c.runs > 0 {
					label = "failed"
				}
				text(b, mid, y0+h-4, 10, "middle", "", label)
				continue
			}
			yTop := yOf(c.Median)
			fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s, MTU %d: %s Gbit/s</title></rect>`+"\n",
				x+1, yTop, barW-2, y0+h-yTop, colorOf(s.name), esc(s.label), mtu, formatValue(c.Median))
			labelY := yTop - 4
			if c.N > 1 && c.Max > c.Min {
				yMin, yMx := yOf(c.Min), yOf(c.Max)
				fmt.Fprintf(b, `<path d="M%.1f %.1fV%.1fM%.1f %.1fH%.1fM%.1f %.1fH%.1f" stroke="#222" stroke-width="1.2" fill="none"/>`+"\n",
					mid, yMin, yMx, mid-4, yMin, mid+4, mid-4, yMx, mid+4)
				labelY = math.Min(labelY, yMx-4)
			}
			text(b, mid, labelY, 11, "middle", "", formatValue(c.Median))
		}
	}
	text(b, float64(svgLeft)+plotW/2, y0+h+36, 12, "middle", "", "MTU of the sandbox's interface, bytes")

	// Host loopback.
	if c := r.cell("host", 0, kind, "gbps"); c.ok() {
		y := yOf(c.Median)
		fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#555" stroke-width="2" stroke-dasharray="6,4"/>`+"\n", svgLeft, y, svgLeft+plotW, y)
		text(b, svgLeft+plotW-4, y-5, 11, "end", "", "host loopback "+formatValue(c.Median)+" Gbit/s")
	}
}

// niceScale returns an axis maximum >= v on a 1-2-2.5-5 grid, and the
// step of its five gridlines.
func niceScale(v float64) (top, step float64) {
	if v <= 0 || math.IsNaN(v) {
		return 1, 0.2
	}
	raw := v / 5
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	return step * math.Ceil(v/step), step
}

func text(b *bytes.Buffer, x, y float64, size int, anchor, weight, s string) {
	w := ""
	if weight != "" {
		w = fmt.Sprintf(` font-weight="%s"`, weight)
	}
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="%d" text-anchor="%s"%s>%s</text>`+"\n", x, y, size, anchor, w, esc(s))
}

var xmlEscaper = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;", "'", "&apos;")

func esc(s string) string { return xmlEscaper.Replace(s) }
