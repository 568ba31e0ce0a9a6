#!/usr/bin/env python3
"""Summary and plot of a soak run (scripts/soak): reads DIR/meta.txt and DIR/rss.csv, writes
DIR/summary.txt (also printed) and DIR/rss.svg. Standard library only; the SVG is written by
hand.

    python3 scripts/lib/soak_plot.py --dir ~/.cache/fmsflow/soak/20261127-131500

Exit status: 0; 3 when the collector's or the engine's steady-state rate is below
min_rate_ratio x target_rate (from meta.txt); 1 on bad input.
"""

import argparse
import csv
import math
import os
import re
import sys
from xml.sax.saxutils import escape

PROCS = [  # (key in rss.csv, label, colour)
    ("engine", "engine (fmsflow run)", "#1f77b4"),
    ("collector", "collector (fmsflow collect)", "#d62728"),
    ("sim", "simulator (fmsflow sim)", "#2ca02c"),
]



def clock_note(meta):
    """How fast the simulator's and collector's clocks ran (scripts/soak --speedup), or ''."""
    speedup = meta.get("speedup", "1")
    if speedup in ("", "1"):
        return ""
    return f"{speedup}x (an event hour per {60 / float(speedup):g} wall min), api.keep_hours {meta.get('keep_hours', '?')}"

def read_meta(path):
    meta = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, sep, value = line.rstrip("\n").partition("=")
            if sep:
                meta[key] = value
    return meta


def read_rows(path):
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                v = (v or "").strip()
                try:
                    row[k] = float(v) if v else None
                except ValueError:
                    row[k] = None
            if row.get("elapsed_s") is not None:
                rows.append(row)
    return rows


def span(rows, key):
    """First and last rows of `rows` where `key` has a value."""
    have = [r for r in rows if r.get(key) is not None]
    return (have[0], have[-1]) if len(have) >= 2 else (None, None)


def rate(rows, key):
    """Average increase per second of the counter `key` from the first to the last row."""
    a, b = span(rows, key)
    if a is None or b["elapsed_s"] <= a["elapsed_s"]:
        return None
    return (b[key] - a[key]) / (b["elapsed_s"] - a["elapsed_s"])


def slope_per_hour(rows, key):
    """Least-squares slope of `key` against time, in units per hour."""
    pts = [(r["elapsed_s"] / 3600.0, r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def values(rows, key):
    return [r[key] for r in rows if r.get(key) is not None]


def fmt(v, spec=",.1f", none="n/a"):
    return none if v is None else format(v, spec)


def last_line(path, pattern):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            found = [line.strip() for line in f if re.search(pattern, line)]
    except OSError:
        return None
    return found[-1] if found else None


def summarize(meta, rows, out_dir):
    target = float(meta.get("target_rate", "0") or 0)
    ratio = float(meta.get("min_rate_ratio", "0.9") or 0.9)
    warmup = float(meta.get("warmup_s", "0") or 0)
    steady = [r for r in rows if r["elapsed_s"] >= warmup]
    if len(steady) < 2:
        steady = rows
    t_ss, t_end = steady[0]["elapsed_s"], rows[-1]["elapsed_s"]

    figures = {}
    lines = []
    add = lines.append
    add("fmsflow soak")
    add(f"  date        {meta.get('date', '?')}")
    add(f"  commit      {meta.get('commit', '?')}")
    add(f"  binary      {meta.get('binary', '?')}")
    add(f"  machine     {meta.get('machine', '?')}")
    if meta.get("env", "").strip():
        add(f"  settings    {meta['env'].strip()}")
    if clock_note(meta):
        add(f"  clocks      {clock_note(meta)}")
    add(
        f"  run         {int(float(meta.get('devices', 0))):,} devices every {meta.get('interval', '?')}"
        f" (target {target:,.0f} msg/s) for {float(meta.get('duration_s', 0)) / 60:g} min,"
        f" {len(rows)} samples every {meta.get('sample_s', '?')} s"
    )
    add(f"  steady      from {t_ss:,.0f} s to {t_end:,.0f} s ({(t_end - t_ss) / 60:.1f} min)")
    add("")

    add("Achieved rate, steady state (whole run in brackets)")
    failures = []
    for key, label in (("collector_delivered", "collector, delivered to Kafka"),
                       ("engine_records", "engine, records read")):
        r_ss, r_all = rate(steady, key), rate(rows, key)
        figures[key] = r_ss
        pct = f"{100 * r_ss / target:5.1f} % of target" if (r_ss is not None and target) else "n/a"
        add(f"  {label:31s} {fmt(r_ss, ',.0f'):>8s} msg/s  {pct}  [{fmt(r_all, ',.0f')} msg/s]")
        if r_ss is None:
            failures.append(f"{label}: no rate measured")
        elif target and r_ss < ratio * target:
            failures.append(f"{label}: {r_ss:,.0f} msg/s < {ratio:g} x {target:,.0f}")
    prod = span(rows, "collector_produced")[1]
    dele = span(rows, "collector_delivered")[1]
    recs = span(rows, "engine_records")[1]
    if prod and dele and recs:
        add(f"  totals at the end: {prod['collector_produced']:,.0f} produced, "
            f"{dele['collector_delivered']:,.0f} delivered, {recs['engine_records']:,.0f} read by the engine")
    lags = values(steady, "engine_lag")
    if lags:
        add(f"  engine lag (records behind the topic's end): end {lags[-1]:,.0f}, max {max(lags):,.0f}, "
            f"mean {sum(lags) / len(lags):,.0f}")
    errs = values(rows, "collector_poll_errors")
    if errs:
        add(f"  collector poll errors (4xx, 5xx, timeouts, connection): {errs[-1]:,.0f}")
    skips = values(rows, "collector_polls_skipped")
    if skips:
        add(f"  collector polls skipped (the device's previous poll still running): {skips[-1]:,.0f}")
    add("")

    add("RSS in MiB (VmRSS; peak = VmHWM)")
    add(f"  {'process':12s} {'start':>9s} {'steady':>9s} {'end':>9s} {'max':>9s} {'peak':>9s} {'slope MiB/h':>12s}")
    for key, label in (("engine", "engine"), ("collector", "collector"), ("sim", "simulator"),
                       ("kafka", "Kafka (JVM)")):
        rk = f"{key}_rss_mib"
        allv, ssv = values(rows, rk), values(steady, rk)
        if not allv:
            add(f"  {label:12s} no samples")
            continue
        hwm = values(rows, f"{key}_hwm_mib")
        slope = slope_per_hour(steady, rk)
        figures[f"{key}_slope"] = slope
        figures[f"{key}_end"] = allv[-1]
        add(f"  {label:12s} {allv[0]:9.1f} {ssv[0] if ssv else float('nan'):9.1f} {allv[-1]:9.1f} {max(allv):9.1f} "
            f"{fmt(max(hwm) if hwm else None, '9.1f', '        -')} {fmt(slope, '+12.1f')}")
    add("  (start: first sample; steady: first sample of the steady state; slope: least squares over the steady state)")
    e_ss, e_end = span(steady, "engine_rss_mib")
    r_ss, r_end = span(steady, "engine_records")
    if e_ss and r_ss and r_end["engine_records"] > r_ss["engine_records"]:
        grew = e_end["engine_rss_mib"] - e_ss["engine_rss_mib"]
        per = grew * 1048576 / (r_end["engine_records"] - r_ss["engine_records"])
        add(f"  engine growth over the steady state: {grew:+,.1f} MiB "
            f"({100 * grew / e_ss['engine_rss_mib']:+.1f} %), {per:+,.1f} bytes per record read")
    add("")

    add("CPU, steady state (cores used on average)")
    parts = []
    for key, label in (("engine", "engine"), ("collector", "collector"), ("sim", "simulator"), ("kafka", "Kafka")):
        c = rate(steady, f"{key}_cpu_s")
        parts.append(f"{label} {fmt(c, '.2f')}")
    loads = values(steady, "load1")
    add("  " + ", ".join(parts) + (f"; load average (1 min) mean {sum(loads) / len(loads):.2f}" if loads else ""))
    avail = values(rows, "mem_available_mib")
    if avail:
        add(f"  machine MemAvailable: start {avail[0]:,.0f} MiB, min {min(avail):,.0f} MiB")
    add("")

    eng = last_line(os.path.join(out_dir, "engine.log"), r"^replayed \d+ records")
    col = last_line(os.path.join(out_dir, "collect.log"), r"^collected: ")
    if eng or col:
        add("At the stop")
        if col:
            add(f"  collector: {col}")
        if eng:
            add(f"  engine:    {eng}")
        add("")

    if failures:
        add(f"RESULT: FAIL, below {ratio:g} x the target rate: " + "; ".join(failures))
    else:
        add(f"RESULT: ok, both rates at least {ratio:g} x the target of {target:,.0f} msg/s")
    return "\n".join(lines) + "\n", failures, figures


# --- the plot -------------------------------------------------------------------------------

def nice_step(span_, ticks=6):
    if span_ <= 0:
        return 1.0
    raw = span_ / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def ticks(hi, n=6):
    step = nice_step(hi, n)
    top = math.ceil(hi / step - 1e-9) * step if hi > 0 else step
    k = int(round(top / step))
    return [i * step for i in range(k + 1)], top


def tick_label(v, step):
    """`v` with as many decimals as the tick step needs (0.25 -> 2, 0.5 -> 1, 5 -> 0)."""
    decimals = 0
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f"{v:,.{decimals}f}"


class Panel:
    def __init__(self, x, y, w, h, xmax, ymax):
        self.x, self.y, self.w, self.h = x, y, w, h
        self.xmax, self.ymax = xmax or 1, ymax or 1

    def px(self, v):
        return self.x + self.w * v / self.xmax

    def py(self, v):
        return self.y + self.h - self.h * v / self.ymax


def polyline(panel, pts, colour, width=1.8, dash=None, opacity=1.0):
    """Polylines through the points, broken where a value is missing."""
    out, seg = [], []
    for x, y in pts + [(None, None)]:
        if y is None or x is None:
            if len(seg) >= 2:
                d = f' stroke-dasharray="{dash}"' if dash else ""
                out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{width}"{d} '
                           f'stroke-opacity="{opacity}" stroke-linejoin="round" points="{" ".join(seg)}"/>')
            elif len(seg) == 1:
                cx, cy = seg[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
            seg = []
            continue
        seg.append(f"{panel.px(x):.1f},{panel.py(y):.1f}")
    return out


def axes(panel, xticks, yticks, ylabel, xlabel):
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1
    o = [f'<rect x="{panel.x}" y="{panel.y}" width="{panel.w}" height="{panel.h}" fill="#ffffff" stroke="#999"/>']
    for v in yticks:
        y = panel.py(v)
        o.append(f'<line x1="{panel.x}" y1="{y:.1f}" x2="{panel.x + panel.w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        o.append(f'<text x="{panel.x - 6}" y="{y + 4:.1f}" text-anchor="end">{tick_label(v, ystep)}</text>')
    for v in xticks:
        x = panel.px(v)
        o.append(f'<line x1="{x:.1f}" y1="{panel.y}" x2="{x:.1f}" y2="{panel.y + panel.h}" stroke="#f0f0f0"/>')
        o.append(f'<text x="{x:.1f}" y="{panel.y + panel.h + 16}" text-anchor="middle">{tick_label(v, xstep)}</text>')
    cy = panel.y + panel.h / 2
    o.append(f'<text x="{panel.x - 52}" y="{cy:.1f}" text-anchor="middle" '
             f'transform="rotate(-90 {panel.x - 52} {cy:.1f})">{escape(ylabel)}</text>')
    if xlabel:
        o.append(f'<text x="{panel.x + panel.w / 2:.1f}" y="{panel.y + panel.h + 34}" '
                 f'text-anchor="middle">{escape(xlabel)}</text>')
    return o


def plot(meta, rows, figures, path):
    W, H = 960, 680
    left, right = 80, 24
    pw = W - left - right
    t_min = [r["elapsed_s"] / 60 for r in rows]
    xt, xmax = ticks(max(t_min) if t_min else 1, 10)
    warm_min = float(meta.get("warmup_s", "0") or 0) / 60
    target = float(meta.get("target_rate", "0") or 0)

    peak = max([v for k, _, _ in PROCS for v in values(rows, f"{k}_rss_mib") + values(rows, f"{k}_hwm_mib")] or [1])
    yt, ymax = ticks(peak * 1.08, 6)
    top = Panel(left, 168, pw, 300, xmax, ymax)

    # msg/s between samples.
    rates = {"collector_delivered": [], "engine_records": []}
    for key in rates:
        prev = None
        for r, tm in zip(rows, t_min):
            v = r.get(key)
            if v is not None and prev is not None and r["elapsed_s"] > prev[0]:
                rates[key].append(((tm + prev[0] / 60) / 2, (v - prev[1]) / (r["elapsed_s"] - prev[0])))
            if v is not None:
                prev = (r["elapsed_s"], v)
    rmax = max([v for s in rates.values() for _, v in s] + [target, 1])
    rt, rtop = ticks(rmax * 1.1, 4)
    bottom = Panel(left, 530, pw, 100, xmax, rtop)

    devices = int(float(meta.get("devices", 0) or 0))
    title = "fmsflow soak: resident memory over time"
    sub = (f"{devices:,} devices polled every {meta.get('interval', '?')} (target {target:,.0f} msg/s), "
           f"{float(meta.get('duration_s', 0) or 0) / 60:g} min, sampled every {meta.get('sample_s', '?')} s; "
           f"commit {meta.get('commit', '?')}, {meta.get('date', '?')[:10]}")
    if clock_note(meta):
        sub += f"; clocks {clock_note(meta)}"
    mach = meta.get("machine", "")
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="DejaVu Sans, Arial, Helvetica, sans-serif" font-size="12" fill="#222">',
         f'<rect width="{W}" height="{H}" fill="#fafafa"/>',
         f'<text x="{left}" y="28" font-size="17" font-weight="bold">{escape(title)}</text>',
         f'<text x="{left}" y="48">{escape(sub)}</text>',
         f'<text x="{left}" y="66" fill="#555">{escape(mach)}</text>']
    o += axes(top, xt, yt, "RSS (MiB)", "")
    o += axes(bottom, xt, rt, "msg/s", "minutes since all processes ran")

    for panel in (top, bottom):
        if 0 < warm_min < xmax:
            x = panel.px(warm_min)
            o.append(f'<line x1="{x:.1f}" y1="{panel.y}" x2="{x:.1f}" y2="{panel.y + panel.h}" '
                     f'stroke="#888" stroke-dasharray="5,4"/>')
    if 0 < warm_min < xmax:
        o.append(f'<text x="{top.px(warm_min) + 5:.1f}" y="{top.y + 14}" fill="#666">steady state from here</text>')

    for key, label, colour in PROCS:
        o += polyline(top, [(tm, r.get(f"{key}_hwm_mib")) for tm, r in zip(t_min, rows)], colour,
                      width=1, dash="2,3", opacity=0.6)
        o += polyline(top, [(tm, r.get(f"{key}_rss_mib")) for tm, r in zip(t_min, rows)], colour)

    # Legend, above the RSS panel.
    ly = 90
    for key, label, colour in PROCS:
        end, slope = figures.get(f"{key}_end"), figures.get(f"{key}_slope")
        text = f"{label}: {fmt(end)} MiB at the end, slope over the steady state {fmt(slope, '+,.1f')} MiB/h"
        o.append(f'<line x1="{left}" y1="{ly - 4}" x2="{left + 26}" y2="{ly - 4}" stroke="{colour}" stroke-width="2.5"/>')
        o.append(f'<text x="{left + 34}" y="{ly}">{escape(text)}</text>')
        ly += 18
    o.append(f'<line x1="{left}" y1="{ly - 4}" x2="{left + 26}" y2="{ly - 4}" stroke="#555" '
             f'stroke-width="1" stroke-dasharray="2,3"/>')
    o.append(f'<text x="{left + 34}" y="{ly}" fill="#555">dotted: peak so far (VmHWM) of the same process</text>')

    # Rates.
    if target:
        y = bottom.py(target)
        o.append(f'<line x1="{bottom.x}" y1="{y:.1f}" x2="{bottom.x + bottom.w}" y2="{y:.1f}" '
                 f'stroke="#999" stroke-dasharray="6,3"/>')
        o.append(f'<text x="{bottom.x + bottom.w - 4}" y="{y - 4:.1f}" text-anchor="end" fill="#666">target</text>')
    for key, colour, label in (("collector_delivered", "#d62728", "collector, delivered"),
                               ("engine_records", "#1f77b4", "engine, read")):
        o += polyline(bottom, rates[key], colour, width=1.4)
    lx = bottom.x + 10
    for colour, label in (("#d62728", "collector, delivered to Kafka"), ("#1f77b4", "engine, records read")):
        o.append(f'<line x1="{lx}" y1="{bottom.y - 8}" x2="{lx + 22}" y2="{bottom.y - 8}" stroke="{colour}" stroke-width="2"/>')
        o.append(f'<text x="{lx + 28}" y="{bottom.y - 4}">{escape(label)}</text>')
        lx += 240
    o.append(f'<text x="{bottom.x + bottom.w}" y="{bottom.y - 4}" text-anchor="end" fill="#555">'
             f'msg/s between two samples</text>')
    o.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(o) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="the soak's output dir (meta.txt, rss.csv)")
    args = ap.parse_args()
    try:
        meta = read_meta(os.path.join(args.dir, "meta.txt"))
        rows = read_rows(os.path.join(args.dir, "rss.csv"))
    except OSError as e:
        print(f"soak_plot: {e}", file=sys.stderr)
        return 1
    if len(rows) < 2:
        print(f"soak_plot: {args.dir}/rss.csv has {len(rows)} samples; need at least 2", file=sys.stderr)
        return 1
    text, failures, figures = summarize(meta, rows, args.dir)
    with open(os.path.join(args.dir, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(meta, rows, figures, os.path.join(args.dir, "rss.svg"))
    sys.stdout.write(text)
    return 3 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
