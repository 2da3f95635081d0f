#!/usr/bin/env python3
"""`make bench`: bulwark-broker side by side with Mosquitto and rumqttd.

For every round and scenario, each broker is started fresh (new data directory, free
ports, configuration rendered from bench/*.toml|conf), the load generator
target/release/bulwark-bench runs against it, and the broker is stopped again. Brokers
take turns in an order rotated per round. A pinned pass puts the broker on one CPU and the
generator on another (taskset); an unpinned pass is reported separately. Each run's JSON
line goes to bench/.run/results.jsonl; the medians, ratios and pass/fail against the
targets go to stdout, BENCHMARKS.md and bench/ratios.svg.

Environment (all optional):
  BENCH_SCALE=0.2           scale message, client and topic counts (not publishers/subscribers)
  BENCH_ROUNDS=3            pinned rounds
  BENCH_LATENCY_ROUNDS=7    pinned rounds of the latency scenarios (at least BENCH_ROUNDS):
                            a 5-second run's p50 and p99 swing by ±20 % on a shared machine
  BENCH_UNPINNED_ROUNDS=1   unpinned rounds (0: no unpinned pass)
  BENCH_ONLY=a,b            scenarios (or prefixes: fan-in, latency, ...; agent, tunnel)
  BENCH_BROKERS=...         subset of bulwark,bulwark-sync,mosquitto,rumqttd
  BENCH_PAYLOAD=64          payload bytes      BENCH_WINDOW=100   generator window
  BENCH_MAX_SECONDS=120     per generator run  BENCH_GEN=path     another generator
  BENCH_NO_INSTALL=1        never install Mosquitto or rumqttd
  BENCH_REPORT_ONLY=1       only rebuild the report from bench/.run/results.jsonl
  BENCH_KEEP_DATA=1         keep the brokers' data directories under bench/.run/data
  BENCH_STEP_TIMEOUT=1800   seconds for each of the agent and tunnel steps (cargo test)

Scenarios: fan-in-qos0, fan-in-qos1, fan-out-qos0, fan-out-qos1, latency-qos0,
latency-qos1, conn-scale-tcp, conn-scale-tls, handshake-tls, retained; then the steps
`agent` (integration-tests/tests/agent_rates.rs) and `tunnel` (tests/tunnel.rs,
throughput_and_latency_vs_ssh_forwarding), whose JSON lines with a "scenario" field go to
bench/.run/agent.jsonl and tunnel.jsonl. Exit status: 0 when the runs completed (failed
targets are reported, not fatal), 2 when something must be fixed first (a broker that does
not start, a missing binary, a bad setting), 130 on Ctrl-C.

Python 3 standard library only.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import getpass
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape as _xml_escape

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RUN = BENCH_DIR / ".run"
RELEASE = ROOT / "target" / "release"
CARGO_BIN = Path.home() / ".cargo" / "bin"

# Limits every broker gets (placeholders in bench/bulwark.toml, mosquitto.conf, rumqttd.toml).
SHARED_LIMITS = {
    "MAX_CONNECTIONS": 20000,
    "MAX_INFLIGHT": 100,  # rumqttd: fixed at 100 (const MAX_INFLIGHT, router/iobufs.rs)
    "MAX_QUEUED_MESSAGES": 200000,
    "MAX_QUEUED_BYTES": 256 * 1024 * 1024,
    "MAX_PACKET_SIZE": 1024 * 1024,
}

ALL_BROKERS = ["bulwark", "bulwark-sync", "mosquitto", "rumqttd"]
PEERS = ["mosquitto", "rumqttd"]

STOP_GRACE_S = 5.0
READY_TIMEOUT_S = 30.0


class BenchError(Exception):
    """A failure the operator has to fix; the message says what."""


# --------------------------------------------------------------------------------------
# Pure helpers (unit-tested in scripts/test_bench.py)


def median(values):
    """Median of the numbers in `values` that are not None; None if there are none."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return statistics.median(vals)


def ratio(value, reference):
    """value / reference, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return float(value) / float(reference)


def normalised(r, higher_is_better):
    """A ratio turned so that > 1.0 is good for Bulwark."""
    if r is None or r <= 0:
        return None
    return r if higher_is_better else 1.0 / r


def scaled(n, scale, minimum=1):
    return max(minimum, int(round(n * scale)))


def rotated(items, k):
    items = list(items)
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def render_template(text, values):
    """Fills @NAME@ placeholders; every placeholder in `text` must have a value."""

    def sub(m):
        key = m.group(1)
        if key not in values:
            raise BenchError(f"no value for placeholder @{key}@")
        return str(values[key])

    return re.sub(r"@([A-Z][A-Z0-9_]*)@", sub, text)


def selected(name, only):
    """Is scenario `name` chosen by BENCH_ONLY tokens (exact names or dash prefixes)?"""
    if not only:
        return True
    return any(name == t or name.startswith(t + "-") for t in only)


def fmt_num(v, digits=0):
    if v is None:
        return "n/a"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}"


# Headline rows: (scenario, field, label, higher_is_better, target).
# target: None, or (reference, op, factor): reference "best" (best peer) or a broker label.
@dataclass(frozen=True)
class Row:
    scenario: str
    field: str
    label: str
    higher: bool
    target: tuple | None
    digits: int = 0


ROWS = [
    Row("fan-in-qos0", "msgs_per_s", "msgs/s", True, ("best", ">=", 1.0)),
    Row("fan-in-qos1", "msgs_per_s", "msgs/s", True, ("best", ">=", 1.0)),
    Row("fan-out-qos0", "msgs_per_s", "msgs/s", True, ("best", ">=", 1.0)),
    Row("fan-out-qos1", "msgs_per_s", "msgs/s", True, ("best", ">=", 1.0)),
    Row("latency-qos0", "p50_us", "p50 µs", False, ("mosquitto", "<=", 1.0)),
    Row("latency-qos0", "p99_us", "p99 µs", False, ("mosquitto", "<=", 1.0)),
    Row("latency-qos1", "p50_us", "p50 µs", False, ("mosquitto", "<=", 1.0)),
    Row("latency-qos1", "p99_us", "p99 µs", False, ("mosquitto", "<=", 1.0)),
    Row("conn-scale-tcp", "bytes_per_conn", "bytes/conn", False, ("mosquitto", "<=", 1.5)),
    Row("conn-scale-tcp", "connects_per_s", "connects/s", True, ("mosquitto", ">=", 1.0)),
    Row("conn-scale-tls", "bytes_per_conn", "bytes/conn", False, ("mosquitto", "<=", 1.5)),
    Row("conn-scale-tls", "connects_per_s", "connects/s", True, ("mosquitto", ">=", 1.0)),
    Row("handshake-tls", "handshakes_per_s", "handshakes/s", True, ("mosquitto", ">=", 1.0)),
    Row("retained", "msgs_per_s", "msgs/s", True, None),
]

QOS1_SCENARIOS = ["fan-in-qos1", "fan-out-qos1", "latency-qos1", "retained"]  # retained: QoS 1 throughout


def target_text(target):
    if target is None:
        return "— (info)"
    ref, op, factor = target
    who = "best peer" if ref == "best" else ref
    f = "" if factor == 1.0 else f"{factor:g} × "
    return f"{'≥' if op == '>=' else '≤'} {f}{who}"


def reference_peer(peers, target):
    """The peer whose median `target` compares Bulwark with (None if there is none)."""
    if target is None:
        return None
    ref, op, _factor = target
    if ref == "best":
        named = [(v, p) for p, v in peers.items() if v is not None]
        if not named:
            return None
        return (max(named) if op == ">=" else min(named))[1]
    return ref if peers.get(ref) is not None else None


def verdict(bulwark, peers, target):
    """'PASS', 'FAIL' or 'n/a' for Bulwark's median against `target`."""
    if target is None:
        return "—"
    _ref, op, factor = target
    who = reference_peer(peers, target)
    refv = peers.get(who) if who else None
    if bulwark is None or refv is None:
        return "n/a"
    ok = bulwark >= refv * factor if op == ">=" else bulwark <= refv * factor
    return "PASS" if ok else "FAIL"


def row_ratio(row, bulwark, peers):
    """The table's ratio: rates bulwark / max(peers); latency and memory bulwark / mosquitto."""
    if row.higher:
        vals = [v for v in peers.values() if v is not None]
        return ratio(bulwark, max(vals) if vals else None)
    return ratio(bulwark, peers.get("mosquitto"))


def aggregate(results, pinned):
    """{(scenario, broker): {"runs": [...], field: median, ...}} for one pass."""
    groups = {}
    for r in results:
        if bool(r.get("pinned")) != pinned or "scenario_id" not in r:
            continue
        groups.setdefault((r["scenario_id"], r.get("broker")), []).append(r)
    out = {}
    for key, runs in groups.items():
        ok = [r for r in runs if not r.get("error")]
        agg = {
            "runs": len(runs),
            "ok": len(ok),
            "timeouts": sum(1 for r in ok if r.get("timed_out")),
            "errors": [r["error"] for r in runs if r.get("error")],
            "lost_total": sum(int(r.get("lost") or 0) for r in ok),
            "failed_total": sum(int(r.get("failed") or 0) for r in ok),
            "duplicates_total": sum(int(r.get("duplicates") or 0) for r in ok),
            "crashed": sum(1 for r in runs if r.get("broker_crashed")),
        }
        fields = set()
        for r in ok:
            fields.update(k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        agg["rounds"] = {}
        for f in fields:
            agg["rounds"][f] = [r[f] for r in ok if isinstance(r.get(f), (int, float)) and r[f] == r[f]]
            agg[f] = median(agg["rounds"][f])
        out[key] = agg
    return out


def build_rows(agg, brokers):
    """Table rows (dicts) with medians, ratio and verdict for every headline row present."""
    rows = []
    scenarios = {s for (s, _b) in agg}
    for row in ROWS:
        if row.scenario not in scenarios:
            continue
        vals, gen = {}, {}
        for b in brokers:
            a = agg.get((row.scenario, b))
            vals[b] = a.get(row.field) if a else None
            gen[b] = a.get("gen_cpu_pct") if a else None
        # A peer that lost QoS 1 messages did less work than asked: its figure is shown (‡)
        # but is no reference for Bulwark.
        lossy = {b for b in brokers if row.scenario in QOS1_SCENARIOS
                 and (agg.get((row.scenario, b)) or {}).get("lost_total")}
        peers = {p: vals.get(p) for p in PEERS if p in brokers and p not in lossy}
        r = row_ratio(row, vals.get("bulwark"), peers)
        spread = {}
        for b in brokers:
            runs = ((agg.get((row.scenario, b)) or {}).get("rounds") or {}).get(row.field) or []
            spread[b] = (min(runs), max(runs)) if runs else None
        rows.append(
            {
                "row": row,
                "values": vals,
                "spread": spread,
                "reference": reference_peer(peers, row.target),
                "gen": gen,
                "lossy": lossy,
                "timeouts": {b: (agg.get((row.scenario, b)) or {}).get("timeouts", 0) for b in brokers},
                "ratio": r,
                "norm": normalised(r, row.higher),
                "verdict": verdict(vals.get("bulwark"), peers, row.target),
            }
        )
    for s in QOS1_SCENARIOS:
        if s not in scenarios:
            continue
        lost = {b: (agg[(s, b)]["lost_total"] if (s, b) in agg else None) for b in brokers}
        bl = lost.get("bulwark")
        rows.append(
            {
                "row": Row(s, "lost", "QoS1 lost (total)", False, ("zero", "==", 0)),
                "values": lost,
                "gen": {},
                "timeouts": {},
                "ratio": None,
                "norm": None,
                "verdict": "n/a" if bl is None else ("PASS" if bl == 0 else "FAIL"),
            }
        )
    return rows


def loud_problems(agg):
    """Messages about lost QoS1 messages, failed connections, timeouts, errors, crashes."""
    out = []
    for (s, b), a in sorted(agg.items()):
        if s in QOS1_SCENARIOS and a["lost_total"]:
            out.append(f"!!! {b} LOST {a['lost_total']} QoS1 messages in {s} !!!")
        if a["failed_total"]:
            out.append(f"!! {b}: {a['failed_total']} failed connections in {s}")
        if a["duplicates_total"] and s.endswith("qos0"):
            out.append(f"! {b}: {a['duplicates_total']} duplicates in {s} (QoS 0 must have none)")
        if a["timeouts"]:
            out.append(f"! {b}: {a['timeouts']} run(s) of {s} hit the time limit")
        if a["crashed"]:
            out.append(f"!!! {b} CRASHED during {a['crashed']} run(s) of {s} !!!")
        for e in a["errors"]:
            out.append(f"!! {b}: {s}: {e}")
    return out


def markdown_table(rows, brokers):
    cols = ["scenario", "metric"] + brokers + ["ratio: Bulwark ÷ best peer (↑ rows), ÷ Mosquitto (↓ rows)", "target", "result"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        row = r["row"]
        cells = [row.scenario, f"{row.label} ({'↑' if row.higher else '↓'})" if row.field != "lost" else row.label]
        for b in brokers:
            v = r["values"].get(b)
            if row.field == "lost":
                cell = "n/a" if v is None else (str(v) if v == 0 else f"**{v} LOST**")
            else:
                cell = fmt_num(v, row.digits)
                g = r["gen"].get(b)
                if v is not None and g is not None:
                    cell += f" (gen {g:.0f}%)"
                if r["timeouts"].get(b):
                    cell += " †"
                if b in r.get("lossy", ()):
                    cell += " ‡"
            cells.append(cell)
        cells.append(fmt_ratio(r["ratio"]))
        if row.field == "lost":
            cells.append("= 0")
        else:
            cells.append(target_text(row.target))
        v = r["verdict"]
        cells.append(f"**{v}**" if v == "FAIL" else v)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranges_overlap(a, b):
    """Do the closed ranges `a` and `b` ((low, high) or None) share a value?"""
    if a is None or b is None:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def spread_table(rows, brokers):
    """Every round's lowest and highest figure per broker, and whether Bulwark's range and
    its target's (the reference's range times the target's factor) overlap: where they do,
    the verdict on the medians is within the round-to-round noise of this machine."""
    cols = ["scenario", "metric"] + brokers + ["target", "Bulwark's rounds vs the target's"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        row = r["row"]
        if "spread" not in r:  # the QoS 1 loss rows
            continue
        cells = [row.scenario, row.label]
        for b in brokers:
            sp = r["spread"].get(b)
            cells.append("" if sp is None else f"{fmt_num(sp[0], row.digits)} – {fmt_num(sp[1], row.digits)}")
        ref = r.get("reference")
        ours, theirs = r["spread"].get("bulwark"), r["spread"].get(ref) if ref else None
        if theirs is not None:
            factor = row.target[2]
            theirs = (theirs[0] * factor, theirs[1] * factor)
        cells.append(target_text(row.target) if ref else "")
        overlap = ranges_overlap(ours, theirs)
        if overlap is None:
            cells.append("")
        elif overlap:
            cells.append("overlap (within the noise)")
        else:
            meets = (ours[0] > theirs[1]) == row.higher
            cells.append("apart: meets it in every round" if meets else "apart: misses it in every round")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details_table(agg, brokers):
    """Every broker's medians of the secondary figures."""
    fields = [
        ("duration_s", 2),
        ("broker_cpu_pct", 0),
        ("gen_cpu_pct", 0),
        ("broker_rss_kb", 0),
        ("p999_us", 0),
        ("max_us", 0),
        ("p50_ms", 2),
        ("p99_ms", 2),
        ("load1", 1),
    ]
    cols = ["scenario", "broker", "runs"] + [f for f, _ in fields] + ["lost", "dups", "failed"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = {b: i for i, b in enumerate(brokers)}
    scen_order = {r.scenario: i for i, r in enumerate(ROWS)}
    for (s, b), a in sorted(agg.items(), key=lambda kv: (scen_order.get(kv[0][0], 99), kv[0][0], order.get(kv[0][1], 99))):
        cells = [s, b, f"{a['ok']}/{a['runs']}"]
        for f, d in fields:
            cells.append(fmt_num(a.get(f), d) if a.get(f) is not None else "")
        cells += [str(a["lost_total"]), str(a["duplicates_total"]), str(a["failed_total"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generic_table(records):
    """A table of whatever fields the records contain (agent and tunnel figures)."""
    keys = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in records:
        cells = []
        for k in keys:
            v = r.get(k, "")
            if isinstance(v, float):
                v = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
            elif isinstance(v, (dict, list)):
                v = json.dumps(v)
            cells.append(str(v).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def svg_chart(bars, title="Bulwark relative to its peers (right of 1.0 = Bulwark better)"):
    """A horizontal bar chart of normalised ratios on a log scale around 1.0.

    bars: [(label, normalised_ratio or None, verdict)]; returns SVG text."""
    lo, hi = 1 / 8, 8.0
    left, plot_w, right_pad = 330, 420, 90
    top, bar_h, gap = 64, 18, 8
    width = left + plot_w + right_pad
    height = top + len(bars) * (bar_h + gap) + 60
    span = math.log2(hi) - math.log2(lo)

    def x(v):
        v = min(max(v, lo), hi)
        return left + (math.log2(v) - math.log2(lo)) / span * plot_w

    colour = {"PASS": "#2e7d32", "FAIL": "#c62828"}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{_xml_escape(title)}</text>',
        f'<text x="{width / 2:.0f}" y="38" text-anchor="middle" fill="#555">'
        + _xml_escape("throughput and rates: Bulwark / peer; latency and memory: peer / Bulwark (log scale)")
        + "</text>",
    ]
    axis_y = top + len(bars) * (bar_h + gap) + 4
    for t in (0.125, 0.25, 0.5, 1, 2, 4, 8):
        tx = x(t)
        out.append(f'<line x1="{tx:.1f}" y1="{top - 8}" x2="{tx:.1f}" y2="{axis_y}" stroke="#e0e0e0"/>')
        out.append(f'<text x="{tx:.1f}" y="{axis_y + 16}" text-anchor="middle" fill="#555">{t:g}×</text>')
    for i, (label, v, verdict_) in enumerate(bars):
        y = top + i * (bar_h + gap)
        out.append(
            f'<text x="{left - 8}" y="{y + bar_h - 4}" text-anchor="end">{_xml_escape(label)}</text>'
        )
        if v is None:
            out.append(f'<text x="{x(1.0) + 6:.1f}" y="{y + bar_h - 4}" fill="#777">n/a</text>')
            continue
        x0, x1 = x(1.0), x(v)
        fill = colour.get(verdict_, "#757575")
        out.append(
            f'<rect x="{min(x0, x1):.1f}" y="{y}" width="{max(abs(x1 - x0), 1):.1f}" height="{bar_h}" fill="{fill}"/>'
        )
        tx = max(x0, x1) + 4
        out.append(f'<text x="{tx:.1f}" y="{y + bar_h - 4}">{v:.2f}×{" " + _xml_escape(verdict_) if verdict_ in colour else ""}</text>')
    out.append(
        f'<line x1="{x(1.0):.1f}" y1="{top - 10}" x2="{x(1.0):.1f}" y2="{axis_y}" stroke="#000" stroke-width="1.5"/>'
    )
    out.append(
        f'<text x="{width / 2:.0f}" y="{height - 8}" text-anchor="middle" fill="#555">'
        + _xml_escape("green: meets its target, red: misses it, grey: no target; bars clipped at 1/8× and 8×")
        + "</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def chart_bars(rows):
    bars = []
    for r in rows:
        row = r["row"]
        if row.field == "lost":
            continue
        ref = "best peer" if row.higher else "Mosquitto"
        bars.append((f"{row.scenario} {row.label} vs {ref}", r["norm"], r["verdict"]))
    return bars


# --------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Scenario:
    name: str
    command: str
    tls: bool
    args: list
    qos: int | None = None


def scenarios(scale, payload, window):
    s = scale
    P, W = str(payload), str(window)
    return [
        Scenario("fan-in-qos0", "fan-in", False,
                 ["--publishers", "10", "--messages", str(scaled(200000, s, 10)), "--qos", "0", "--payload", P, "--window", W], 0),
        Scenario("fan-in-qos1", "fan-in", False,
                 ["--publishers", "10", "--messages", str(scaled(100000, s, 10)), "--qos", "1", "--payload", P, "--window", W], 1),
        # 20,000 × 50 = 1,000,000 deliveries: at 4,000 a run of Bulwark or rumqttd took
        # 0.1-0.2 s, short enough for start-up and a moment of load to swing the ratio.
        Scenario("fan-out-qos0", "fan-out", False,
                 ["--subscribers", "50", "--messages", str(scaled(20000, s, 10)), "--qos", "0", "--payload", P, "--window", W], 0),
        Scenario("fan-out-qos1", "fan-out", False,
                 ["--subscribers", "50", "--messages", str(scaled(20000, s, 10)), "--qos", "1", "--payload", P, "--window", W], 1),
        Scenario("latency-qos0", "latency", False,
                 ["--rate", "2000", "--messages", str(scaled(10000, s, 100)), "--qos", "0", "--payload", P], 0),
        Scenario("latency-qos1", "latency", False,
                 ["--rate", "2000", "--messages", str(scaled(10000, s, 100)), "--qos", "1", "--payload", P], 1),
        # Not scaled down: per-connection memory needs enough connections to stand out of
        # the process's own size and the allocator's granularity (2,000 take about a second).
        Scenario("conn-scale-tcp", "conn-scale", False, ["--clients", str(max(2000, scaled(2000, s))), "--concurrency", "64"]),
        Scenario("conn-scale-tls", "conn-scale", True, ["--clients", str(max(2000, scaled(2000, s))), "--concurrency", "64"]),
        Scenario("handshake-tls", "handshake", True, ["--connections", str(scaled(2000, s, 50)), "--concurrency", "8"]),
        Scenario("retained", "retained", False,
                 ["--topics", str(scaled(1000, s, 10)), "--subscribers", "50", "--payload", P]),
    ]


# --------------------------------------------------------------------------------------
# Processes


CHILDREN: list = []


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def spawn(cmd, **kw):
    """Starts a child in its own process group (so it and its children can be ended)."""
    # The open-file limit was raised in main() (_raise_nofile); children inherit it.
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    CHILDREN.append(p)
    return p


def end(p, grace=STOP_GRACE_S):
    """SIGTERM to the child's process group, SIGKILL after `grace` seconds."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    else:
        # The leader is gone; make sure nothing of its group lingers.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if p in CHILDREN:
        CHILDREN.remove(p)
    return p.returncode


def cleanup():
    for p in list(CHILDREN):
        try:
            end(p, grace=2.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _on_signal(signum, _frame):
    print(f"\nbench: {signal.Signals(signum).name}: stopping the brokers and the generator", file=sys.stderr)
    cleanup()
    sys.exit(130 if signum == signal.SIGINT else 143)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ports(tables=("/proc/net/tcp", "/proc/net/tcp6")):
    """Local ports in LISTEN state, from /proc (None if it cannot be read)."""
    ports, seen = set(), False
    for t in tables:
        try:
            text = Path(t).read_text()
        except OSError:
            continue
        seen = True
        ports |= parse_listen_ports(text)
    return ports if seen else None


def parse_listen_ports(text):
    out = set()
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[3] == "0A":  # TCP_LISTEN
            out.add(int(f[1].rsplit(":", 1)[1], 16))
    return out


def port_accepts(port):
    """Is something listening on 127.0.0.1:port? Read from /proc, so that the probe does
    not show up in the broker's logs as a failed TLS handshake; a connect if /proc is not
    there."""
    listening = listening_ports()
    if listening is not None:
        return port in listening
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path, n=30):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(log is empty)"


def find_exe(name, *extra):
    for c in extra:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin", str(CARGO_BIN)):
        c = Path(d) / name
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def run_quiet(cmd, timeout=30):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e})"


# --------------------------------------------------------------------------------------
# Installation of the peers


def rumqttd_features():
    """Features of the cargo-installed rumqttd (from ~/.cargo/.crates2.json), or None."""
    try:
        data = json.loads((Path.home() / ".cargo" / ".crates2.json").read_text())
    except (OSError, ValueError):
        return None
    for key, info in data.get("installs", {}).items():
        if key.startswith("rumqttd "):
            feats = set(info.get("features", []))
            if not info.get("no_default_features"):
                feats.add("default")
            return sorted(feats)
    return None


def install_peers(brokers, allow_install):
    root = os.geteuid() == 0
    if "mosquitto" in brokers and not find_exe("mosquitto"):
        if not allow_install:
            raise BenchError("mosquitto is not installed (BENCH_NO_INSTALL=1): apt-get install -y mosquitto")
        cmd = ([] if root else ["sudo"]) + ["apt-get", "install", "-y", "mosquitto"]
        print(f"bench: Mosquitto is missing; installing: {' '.join(cmd)}", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(cmd, env=env).returncode != 0:
            upd = ([] if root else ["sudo"]) + ["apt-get", "update"]
            print(f"bench: retrying after {' '.join(upd)}", flush=True)
            subprocess.run(upd, env=env)
            if subprocess.run(cmd, env=env).returncode != 0:
                raise BenchError("could not install Mosquitto; install the Debian package `mosquitto` and run again")
        # The package may start a system instance (port 1883); ours use their own ports.
        if not find_exe("mosquitto"):
            raise BenchError("mosquitto was installed but no mosquitto binary was found (looked on PATH and in /usr/sbin)")
    if "rumqttd" in brokers:
        exe = find_exe("rumqttd")
        feats = rumqttd_features()
        if exe and (feats is None or "verify-client-cert" in feats):
            return
        if not allow_install:
            if exe:
                return  # without client-certificate checks; the report says so
            raise BenchError("rumqttd is not installed (BENCH_NO_INSTALL=1): cargo install rumqttd --features verify-client-cert")
        # verify-client-cert: rumqttd then requires and checks client certificates on its TLS
        # server, as Bulwark and Mosquitto do here; the default build does not.
        cmd = ["cargo", "install", "rumqttd", "--features", "verify-client-cert"]
        why = "is missing" if not exe else "was built without client-certificate checks"
        print(f"bench: rumqttd {why}; installing: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            if exe:
                print("bench: WARNING: that failed; rumqttd's TLS runs without client certificates", flush=True)
                return
            print("bench: that failed; trying the default build: cargo install rumqttd", flush=True)
            if subprocess.run(["cargo", "install", "rumqttd"]).returncode != 0:
                raise BenchError("could not install rumqttd; run `cargo install rumqttd` and look at its errors")


# --------------------------------------------------------------------------------------
# Brokers


@dataclass
class Broker:
    label: str
    proc: subprocess.Popen
    tcp_port: int
    tls_port: int
    log: Path
    data: Path
    conf: Path


@dataclass
class Env:
    gen: str
    gen_common_first: bool
    broker_bin: str
    mosquitto: str | None
    rumqttd: str | None
    certs: Path
    pinned_cpus: tuple | None
    max_seconds: int
    retained_topics: int
    keep_data: bool
    counter: list = field(default_factory=lambda: [0])


def broker_command(env, label, conf):
    if label in ("bulwark", "bulwark-sync"):
        return [env.broker_bin, "run", "--config", str(conf)]
    if label == "mosquitto":
        return [env.mosquitto, "-c", str(conf)]
    if label == "rumqttd":
        return [env.rumqttd, "-q", "-c", str(conf)]
    raise BenchError(f"unknown broker {label}")


def render_config(env, label, run_id, tcp_port, tls_port, data):
    conf_dir = RUN / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    values = dict(SHARED_LIMITS)
    values.update(
        TCP_PORT=tcp_port,
        TLS_PORT=tls_port,
        CERTS=env.certs,
        DATA=data,
        ACL=BENCH_DIR / "acl.conf",
        LOG_BASE=RUN / "logs" / run_id,
        CONF_DIR=BENCH_DIR,
        USER=getpass.getuser(),
        ROUTER_MAX_CONNECTIONS=SHARED_LIMITS["MAX_CONNECTIONS"] + 10,
        MAX_OUTGOING=max(1000, env.retained_topics),
    )
    if label in ("bulwark", "bulwark-sync"):
        values["DURABILITY"] = "sync" if label == "bulwark-sync" else "periodic"
        src, ext = BENCH_DIR / "bulwark.toml", "toml"
    elif label == "mosquitto":
        src, ext = BENCH_DIR / "mosquitto.conf", "conf"
    else:
        src, ext = BENCH_DIR / "rumqttd.toml", "toml"
    out = conf_dir / f"{run_id}.{ext}"
    out.write_text(render_template(src.read_text(), values))
    return out


def start_broker(env, label, run_id, pinned):
    tcp_port, tls_port = free_port(), free_port()
    while tls_port == tcp_port:
        tls_port = free_port()
    data = RUN / "data" / run_id
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True, mode=0o700)
    (RUN / "logs").mkdir(parents=True, exist_ok=True)
    for old in (RUN / "logs").glob(f"{run_id}.*"):  # Mosquitto and the audit log append
        old.unlink()
    conf = render_config(env, label, run_id, tcp_port, tls_port, data)
    log = RUN / "logs" / f"{run_id}.log"
    cmd = broker_command(env, label, conf)
    if pinned and env.pinned_cpus:
        cmd = ["taskset", "-c", str(env.pinned_cpus[0])] + cmd
    with open(log, "wb") as lf:
        p = spawn(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(data))
    b = Broker(label, p, tcp_port, tls_port, log, data, conf)
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = [tcp_port, tls_port]
    while pending:
        if p.poll() is not None:
            raise BenchError(
                f"{label} did not start (exit code {p.returncode}); its configuration is {conf}.\n{broker_logs(b)}\n"
                "Fix the configuration under bench/ (or the broker, or the certificates in bench/.run/certs) and run again."
            )
        if time.monotonic() > deadline:
            end(p)
            raise BenchError(
                f"{label} did not accept connections on 127.0.0.1:{pending[0]} within {READY_TIMEOUT_S:.0f} s; "
                f"configuration {conf}.\n{broker_logs(b)}"
            )
        if port_accepts(pending[0]):
            pending.pop(0)
        else:
            time.sleep(0.05)
    return b


def broker_logs(b, n=30):
    """The tails of the broker's output and of its own log file (Mosquitto logs to a file)."""
    out = f"{b.log} ends with:\n{tail(b.log, n)}"
    own = b.log.with_suffix(".mosquitto.log")
    if own.exists():
        out += f"\n{own} ends with:\n{tail(own, n)}"
    return out


def stop_broker(env, b):
    crashed = b.proc.poll() is not None
    rc = end(b.proc)
    if not env.keep_data:
        shutil.rmtree(b.data, ignore_errors=True)
    return crashed, rc


# --------------------------------------------------------------------------------------
# Generator


def detect_common_first(gen):
    """Do the common options go before the subcommand (top-level --help lists --host)?"""
    out = run_quiet([gen, "--help"])
    return "--host" in out


def generator_command(env, sc, broker, pinned):
    common = ["--host", "127.0.0.1", "--label", broker.label, "--broker-pid", str(broker.proc.pid),
              "--max-seconds", str(env.max_seconds)]
    if sc.tls:
        clients = env.certs / "clients"
        common += ["--port", str(broker.tls_port), "--tls", "--ca", str(env.certs / "ca.pem"),
                   "--cert", str(clients / "bench.pem"), "--key", str(clients / "bench.key"),
                   "--server-name", "localhost"]
    else:
        common += ["--port", str(broker.tcp_port)]
    if env.gen_common_first:
        cmd = [env.gen] + common + [sc.command] + sc.args
    else:
        cmd = [env.gen, sc.command] + sc.args + common
    if pinned and env.pinned_cpus:
        cmd = ["taskset", "-c", str(env.pinned_cpus[1])] + cmd
    return cmd


def run_generator(env, sc, broker, pinned, run_id):
    cmd = generator_command(env, sc, broker, pinned)
    errlog = RUN / "logs" / f"{run_id}.gen.log"
    with open(errlog, "wb") as ef:
        ef.write((" ".join(cmd) + "\n").encode())
        ef.flush()
        p = spawn(cmd, stdout=subprocess.PIPE, stderr=ef, stdin=subprocess.DEVNULL)
        try:
            out, _ = p.communicate(timeout=env.max_seconds + 60)
        except subprocess.TimeoutExpired:
            end(p)
            return None, f"generator still running {env.max_seconds + 60} s after start; killed (log {errlog})"
        finally:
            if p in CHILDREN:
                CHILDREN.remove(p)
    text = out.decode(errors="replace")
    record = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                pass
    if p.returncode != 0 and record is None:
        return None, f"generator exited {p.returncode} without a result; {errlog}:\n{tail(errlog, 10)}"
    if record is None:
        return None, f"generator printed no JSON line (log {errlog})"
    if p.returncode != 0:
        record["gen_exit_code"] = p.returncode
    return record, None


# --------------------------------------------------------------------------------------
# Integration-test figures (agent, tunnel)

STEPS = [
    ("agent", ["cargo", "test", "--release", "-p", "bulwark-integration-tests", "--test", "agent_rates",
               "--", "--ignored", "--nocapture"]),
    ("tunnel", ["cargo", "test", "--release", "-p", "bulwark-integration-tests", "--test", "tunnel",
                "throughput_and_latency_vs_ssh_forwarding", "--", "--ignored", "--nocapture"]),
]


def is_figure_line(line):
    """A JSON object with a "scenario" field (`{"scenario"...`, or keys in another order)."""
    if not line.startswith("{"):
        return False
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and "scenario" in obj


def run_step(name, cmd, timeout):
    log = RUN / f"{name}.log"
    out_path = RUN / f"{name}.jsonl"
    print(f"bench: {name} figures: {' '.join(cmd)} (log {log})", flush=True)
    lines = []
    expired = []
    with open(log, "wb") as lf:
        p = spawn(cmd, stdout=subprocess.PIPE, stderr=lf, stdin=subprocess.DEVNULL, cwd=str(ROOT))
        def expire():
            expired.append(True)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        watchdog = threading.Timer(timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        assert p.stdout is not None
        for raw in p.stdout:
            lf.write(raw)
            lf.flush()
            s = raw.decode(errors="replace").strip()
            if is_figure_line(s):
                lines.append(s)
                print(f"  {s}", flush=True)
        rc = p.wait()
        watchdog.cancel()
        if expired:
            rc = "timeout"
        if p in CHILDREN:
            CHILDREN.remove(p)
    out_path.write_text("".join(l + "\n" for l in lines))
    if rc != 0:
        msg = f"{name} step failed ({'timed out after ' + str(timeout) + ' s' if rc == 'timeout' else 'exit ' + str(rc)}); see {log}"
        print(f"bench: WARNING: {msg}\n{tail(log, 15)}", flush=True)
        return msg
    if not lines:
        print(f"bench: WARNING: {name} step printed no JSON lines with a \"scenario\" field", flush=True)
    return None


def read_jsonl(path):
    out = []
    try:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------------------
# Report


def machine_info():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def broker_versions(env_like):
    v = {}
    if env_like.get("broker_bin"):
        v["bulwark"] = run_quiet([env_like["broker_bin"], "--version"]).splitlines()[0:1]
        commit = run_quiet(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = run_quiet(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
        v["bulwark"] = " ".join(v["bulwark"]) + f" (git {commit}{', modified tree' if dirty else ''})"
    if env_like.get("mosquitto"):
        out = run_quiet([env_like["mosquitto"], "-h"])
        m = re.search(r"mosquitto version \S+", out)
        v["mosquitto"] = m.group(0) if m else out.splitlines()[0] if out else "unknown"
    if env_like.get("rumqttd"):
        out = run_quiet([env_like["rumqttd"], "--version"])
        feats = rumqttd_features()
        v["rumqttd"] = (out.splitlines()[0] if out else "unknown") + (
            f" (features: {', '.join(feats)})" if feats is not None else "")
    return v


def write_report(results, meta, brokers, step_errors):
    machine = meta.get("machine") or machine_info()
    versions = meta.get("versions", {})
    lines_out = []
    sections = []
    all_rows = None
    for pinned in (True, False):
        agg = aggregate(results, pinned)
        if not agg:
            continue
        present = [b for b in brokers if any(k[1] == b for k in agg)]
        rows = build_rows(agg, present)
        if all_rows is None:
            all_rows = rows  # the chart shows the pinned pass, or the unpinned one alone
        in_pass = [r for r in results if bool(r.get("pinned")) == pinned and r.get("round") is not None]
        rounds = sorted({r.get("round") for r in in_pass if r.get("scenario") != "latency"} or
                        {r.get("round") for r in in_pass})
        lat_rounds = sorted({r.get("round") for r in in_pass if r.get("scenario") == "latency"})
        count = f"{len(rounds)} round(s)"
        if lat_rounds and len(lat_rounds) != len(rounds):
            count += f", latency {len(lat_rounds)}"
        title = (f"Pinned (broker on CPU {meta.get('pinned_cpus', ['?', '?'])[0]}, generator on CPU "
                 f"{meta.get('pinned_cpus', ['?', '?'])[1]}), medians of {count}") if pinned \
            else f"Unpinned (scheduler's choice), medians of {count}"
        table = markdown_table(rows, present)
        spread = spread_table(rows, present)
        problems = loud_problems(agg)
        sections.append((title, table, spread, details_table(agg, present), problems))
        lines_out.append(f"\n== {title} ==\n{table}\n\nRound-to-round spread:\n{spread}")
        if problems:
            lines_out.append("\n".join(problems))
    print("\n".join(lines_out), flush=True)

    svg = svg_chart(chart_bars(all_rows or []))
    (BENCH_DIR / "ratios.svg").write_text(svg)

    md = ["# Benchmarks", ""]
    md.append(
        "`make bench` (scripts/bench.py) runs bulwark-broker, Mosquitto and rumqttd side by side "
        "with the same load generator (`bulwark-bench`, crates/bench) and writes this file. "
        f"Generated {meta.get('date', '?')}."
    )
    md += ["", "## Method", ""]
    md.append(f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine.get('memory') or '? GiB'} RAM, {machine['kernel']}.")
    for b in ("bulwark", "mosquitto", "rumqttd"):
        if b in versions:
            md.append(f"- {b}: {versions[b]}")
    md.append(
        f"- Sizes: BENCH_SCALE={meta.get('scale')} (1 = full size), payload {meta.get('payload')} bytes, "
        f"generator window {meta.get('window')}, rounds: {meta.get('rounds')} pinned "
        f"({meta.get('latency_rounds', meta.get('rounds'))} for the latency scenarios), {meta.get('unpinned_rounds')} unpinned."
    )
    loads = [r["load1"] for r in results if isinstance(r.get("load1"), (int, float))]
    if loads:
        med = median(loads)
        line = f"- 1-minute load average before each run: median {med:.1f}, max {max(loads):.1f}."
        if med > 0.5 * (machine.get("nproc") or 1):
            line += (" **The machine was busy with other work during these runs: the figures are noisy and "
                     "should not be quoted.**")
        md.append(line)
    md.append("- Scenarios (generator arguments at this scale):")
    for sc in meta.get("scenarios", []):
        md.append(f"  - `{sc['name']}`: `{sc['command']} {' '.join(sc['args'])}`{' over TLS with a client certificate' if sc['tls'] else ''}")
    md.append(
        "- Each broker is started fresh for every run (new data directory, free ports, configuration "
        "rendered from bench/bulwark.toml, bench/mosquitto.conf, bench/rumqttd.toml into bench/.run/conf/), "
        "the generator starts once its ports accept connections, and the broker is stopped (SIGTERM, SIGKILL after 5 s) afterwards. "
        "The brokers' order is rotated every round. Open-file limit 65536 (or the hard limit)."
    )
    md.append(
        "- Pinned pass: broker under `taskset -c A`, generator under `taskset -c B` (two different CPUs); "
        "unpinned pass: no pinning. Figures are medians over the rounds; `gen N%` is the generator's median CPU "
        "(100% = one core: near it, the generator rather than the broker may be the limit). † = a run hit the time limit; "
        "‡ = QoS 1 messages were lost in these runs: the figure is shown but is no reference for the ratio and the target."
    )
    md.append(
        f"- Shared limits: max connections {SHARED_LIMITS['MAX_CONNECTIONS']}, in-flight per client {SHARED_LIMITS['MAX_INFLIGHT']}, "
        f"queued messages per client {SHARED_LIMITS['MAX_QUEUED_MESSAGES']} ({SHARED_LIMITS['MAX_QUEUED_BYTES'] // (1024 * 1024)} MiB), "
        f"packet size {SHARED_LIMITS['MAX_PACKET_SIZE'] // 1024} KiB. Plain listener on 127.0.0.1 for anonymous clients, "
        "TLS listener with required client certificates (identity = certificate CN \"bench\")."
    )
    md.append(
        "- **bulwark** runs with `durability = \"periodic\"` (flush every second, like Mosquitto's autosave) and its ACL "
        "(bench/acl.conf); **bulwark-sync** is the same with Bulwark's default `durability = \"sync\"` "
        "(a retained or queued persistent message is on disk before it is acknowledged), shown beside it and "
        "not used in the ratios. Abuse limits are off for loopback (allow-list), $SYS updates are off. "
        "Both serve every connection on the main thread (`[runtime] threads = 1`, the default), like Mosquitto; "
        "rumqttd serves each listener on a thread of its own and routes messages on another."
    )
    md.append(
        "- **Mosquitto**: `persistence false` (Bulwark's periodic store is the stronger guarantee), the same "
        "ACL (bench/mosquitto.acl), `use_identity_as_username`, `set_tcp_nodelay true`, `sys_interval 0`."
    )
    rf = rumqttd_features() if "rumqttd" in versions else None
    mtls = rf is not None and "verify-client-cert" in rf
    md.append(
        "- **rumqttd**: v4 (MQTT 3.1.1) servers; no ACL and no persistence exist in rumqttd (messages live in an "
        "in-memory commit log; a subscriber that falls behind by more than it holds misses messages); TCP_NODELAY is "
        "not set; its in-flight window towards a subscriber is fixed at 100 (hence the shared value); TLS handshakes run one "
        "at a time in its accept loop, which also re-reads the certificate files for every connection. "
        + ("Built with the `verify-client-cert` feature, so its TLS server requires and verifies client certificates like the others."
           if mtls else
           "**Built without the `verify-client-cert` feature: its TLS server neither requests nor checks client "
           "certificates**, so its TLS figures are for server-authenticated TLS only (less work than mutual TLS).")
    )
    md.append(
        "- Ratio: for throughput and rates Bulwark / best peer (higher is better); for latency and memory "
        "Bulwark / Mosquitto (lower is better). Targets: fan-in and fan-out throughput ≥ the best of Mosquitto and "
        "rumqttd; latency p50 and p99 ≤ Mosquitto's; bytes per connection ≤ 1.5 × Mosquitto's; connects/s and "
        "handshakes/s ≥ Mosquitto's; no QoS 1 message lost."
    )
    md += ["", "![Bulwark relative to its peers](bench/ratios.svg)", ""]
    for title, table, spread, details, problems in sections:
        md += [f"## {title}", "", table, ""]
        md += [
            "Round-to-round spread: the lowest and the highest figure of each broker over the rounds, "
            "and whether Bulwark's range and its target's (the range of the peer the target names, times "
            "the target's factor) overlap. Where they overlap, which side of the target the median falls on "
            "is down to this machine's noise.",
            "",
            spread,
            "",
        ]
        if problems:
            md += ["**Problems in these runs:**", ""] + [f"- {p}" for p in problems] + [""]
        md += ["<details><summary>All figures (medians)</summary>", "", details, "", "</details>", ""]
    if not sections:
        md += ["No broker results (see bench/.run/results.jsonl).", ""]
    for name, title in (("agent", "Edge agent"), ("tunnel", "Reverse tunnel")):
        path = RUN / f"{name}.jsonl"
        if path.exists():
            recs = read_jsonl(path)
            when = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            md += [f"## {title} figures", "", f"From `{dict(STEPS)[name][0]} {' '.join(dict(STEPS)[name][1:])}` ({when}).", ""]
            if not recs:
                md += ["(no figures were printed)", ""]
            groups = {}
            for rec in recs:
                groups.setdefault(str(rec.get("scenario")), []).append(rec)
            for scen, group in groups.items():
                md += [f"`{scen}`", "", generic_table([{k: v for k, v in g.items() if k != "scenario"} for g in group]), ""]
            if step_errors.get(name):
                md += [f"**{step_errors[name]}**", ""]
    md.append(
        "Raw results: bench/.run/results.jsonl (git-ignored). Re-render this file from them with "
        "`BENCH_REPORT_ONLY=1 python3 scripts/bench.py`."
    )
    (ROOT / "BENCHMARKS.md").write_text("\n".join(md) + "\n")
    print(f"\nbench: wrote {ROOT / 'BENCHMARKS.md'} and {BENCH_DIR / 'ratios.svg'}", flush=True)


# --------------------------------------------------------------------------------------
# Main


def env_int(name, default):
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise BenchError(f"{name}={v!r} is not a whole number")


def env_float(name, default):
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        f = float(v)
    except ValueError:
        raise BenchError(f"{name}={v!r} is not a number")
    if f <= 0:
        raise BenchError(f"{name} must be greater than 0")
    return f


def ensure_certs(pki):
    certs = RUN / "certs"
    needed = [certs / "ca.pem", certs / "server.pem", certs / "server.key",
              certs / "clients" / "bench.pem", certs / "clients" / "bench.key"]
    if all(p.exists() for p in needed):
        return certs
    cmd = [pki, "init", "--dir", str(certs), "--client", "bench"]
    print(f"bench: certificates: {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not all(p.exists() for p in needed):
        raise BenchError(f"bulwark-pki init failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return certs


def pick_cpus():
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return None
    return (cpus[0], cpus[1])


def run_plan(chosen, brokers, rounds, latency_rounds, unpinned_rounds):
    """The runs in order, as (pinned, round, scenario, broker): pinned rounds, then unpinned
    ones; in each round every scenario against every broker, the brokers' order rotated.
    The latency scenarios (short, and the noisiest) have pinned rounds up to latency_rounds;
    the others stop at rounds."""
    top = max(rounds, latency_rounds) if any(sc.command == "latency" for sc in chosen) else rounds
    out = []
    for pinned, n in ((True, top), (False, unpinned_rounds)):
        for rnd in range(n):
            for sc in chosen:
                if pinned and rnd >= rounds and sc.command != "latency":
                    continue
                for label in rotated(brokers, rnd + (0 if pinned else 1)):
                    out.append((pinned, rnd, sc, label))
    return out


def main():
    _raise_nofile()
    atexit.register(cleanup)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    RUN.mkdir(parents=True, exist_ok=True)

    scale = env_float("BENCH_SCALE", 1.0)
    rounds = env_int("BENCH_ROUNDS", 3)
    latency_rounds = max(rounds, env_int("BENCH_LATENCY_ROUNDS", 7))
    unpinned_rounds = env_int("BENCH_UNPINNED_ROUNDS", 1)
    payload = env_int("BENCH_PAYLOAD", 64)
    window = env_int("BENCH_WINDOW", 100)
    max_seconds = env_int("BENCH_MAX_SECONDS", 120)
    only = [t.strip() for t in os.environ.get("BENCH_ONLY", "").split(",") if t.strip()]
    brokers = [b.strip() for b in os.environ.get("BENCH_BROKERS", ",".join(ALL_BROKERS)).split(",") if b.strip()]
    for b in brokers:
        if b not in ALL_BROKERS:
            raise BenchError(f"BENCH_BROKERS: unknown broker {b!r}; choose from {','.join(ALL_BROKERS)}")
    report_only = os.environ.get("BENCH_REPORT_ONLY") == "1"
    meta_path = RUN / "meta.json"
    results_path = RUN / "results.jsonl"

    if report_only:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        write_report(read_jsonl(results_path), meta, meta.get("brokers", brokers), meta.get("step_errors", {}))
        return 0

    all_sc = scenarios(scale, payload, window)
    chosen = [s for s in all_sc if selected(s.name, only)]
    steps = [(n, c) for n, c in STEPS if selected(n, only)]
    unknown = [t for t in only if not any(selected(s.name, [t]) for s in all_sc) and not any(selected(n, [t]) for n, _ in STEPS)]
    if unknown:
        raise BenchError(f"BENCH_ONLY: {', '.join(unknown)} matches nothing; scenarios: "
                         f"{', '.join(s.name for s in all_sc)}, agent, tunnel")

    gen = str(Path(os.environ.get("BENCH_GEN") or RELEASE / "bulwark-bench").resolve())
    broker_bin = str(RELEASE / "bulwark-broker")
    pki = str(RELEASE / "bulwark-pki")
    if chosen:
        for path, what in ((gen, "the load generator"), (broker_bin, "bulwark-broker"), (pki, "bulwark-pki")):
            if not (Path(path).is_file() and os.access(path, os.X_OK)):
                raise BenchError(f"{path} ({what}) is missing: run `cargo build --release --workspace --bins` "
                                 "(`make bench` does that first)")
        install_peers(brokers, os.environ.get("BENCH_NO_INSTALL") != "1")
    certs = ensure_certs(pki) if chosen else RUN / "certs"

    pinned_cpus = pick_cpus()
    if pinned_cpus is None and rounds > 0 and chosen:
        print("bench: WARNING: fewer than two usable CPUs (or no taskset): the 'pinned' pass runs unpinned", flush=True)
    env = Env(
        gen=gen,
        gen_common_first=detect_common_first(gen) if chosen else True,
        broker_bin=broker_bin,
        mosquitto=find_exe("mosquitto") if "mosquitto" in brokers else None,
        rumqttd=find_exe("rumqttd") if "rumqttd" in brokers else None,
        certs=certs,
        pinned_cpus=pinned_cpus,
        max_seconds=max_seconds,
        retained_topics=scaled(1000, scale, 10),
        keep_data=os.environ.get("BENCH_KEEP_DATA") == "1",
    )
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": broker_versions({"broker_bin": broker_bin, "mosquitto": env.mosquitto, "rumqttd": env.rumqttd}),
        "scale": scale,
        "payload": payload,
        "window": window,
        "rounds": rounds,
        "latency_rounds": latency_rounds,
        "unpinned_rounds": unpinned_rounds,
        "brokers": brokers,
        "pinned_cpus": list(pinned_cpus) if pinned_cpus else ["-", "-"],
        "scenarios": [{"name": s.name, "command": s.command, "args": s.args, "tls": s.tls} for s in chosen],
        "step_errors": {},
    }
    if chosen:
        meta_path.write_text(json.dumps(meta, indent=1))
        for b, v in meta["versions"].items():
            print(f"bench: {b}: {v}", flush=True)
    elif meta_path.exists():
        # Only the agent/tunnel steps run: the broker part of the report stays that of the
        # last broker run (bench/.run/results.jsonl and meta.json).
        meta = json.loads(meta_path.read_text())
        meta["step_errors"] = {}
        brokers = meta.get("brokers", brokers)

    results = []
    if chosen:
        busy = busy_warning()
        if busy:
            print(f"bench: WARNING: {busy}", flush=True)
        if results_path.exists():
            results_path.replace(RUN / "results.prev.jsonl")
        plan = run_plan(chosen, brokers, rounds, latency_rounds, unpinned_rounds)
        total = len(plan)
        n = 0
        started = time.monotonic()
        with open(results_path, "w") as rf:
            for pinned, rnd, sc, label in plan:
                n += 1
                run_id = f"{'p' if pinned else 'u'}{rnd + 1}-{sc.name}-{label}"
                load_before = os.getloadavg()[0]
                b = start_broker(env, label, run_id, pinned)
                t0 = time.monotonic()
                try:
                    rec, err = run_generator(env, sc, b, pinned, run_id)
                finally:
                    crashed, rc = stop_broker(env, b)
                rec = rec or {}
                rec.update(scenario_id=sc.name, broker=label, round=rnd + 1, pinned=pinned,
                           wall_s=round(time.monotonic() - t0, 2), load1=round(load_before, 2))
                rec.setdefault("scenario", sc.command)
                if err:
                    rec["error"] = err
                if crashed:
                    rec["broker_crashed"] = True
                    rec["broker_exit"] = rc
                    rec["error"] = (rec.get("error") + "; " if rec.get("error") else "") + \
                        f"{label} exited (code {rc}) during the run; {broker_logs(b, 10)}"
                rf.write(json.dumps(rec) + "\n")
                rf.flush()
                results.append(rec)
                print(f"[{n}/{total} {'pinned' if pinned else 'unpinned'} r{rnd + 1}] {sc.name:15} {label:13} "
                      + summary(sc, rec), flush=True)
        print(f"bench: {n} runs in {time.monotonic() - started:.0f} s", flush=True)
    else:
        results = read_jsonl(results_path)

    step_timeout = env_int("BENCH_STEP_TIMEOUT", 1800)
    for name, cmd in steps:
        err = run_step(name, cmd, step_timeout)
        if err:
            meta["step_errors"][name] = err
    meta_path.write_text(json.dumps(meta, indent=1))
    write_report(results, meta, brokers, meta["step_errors"])
    bad = [r for r in results if r.get("error")]
    if bad:
        print(f"bench: {len(bad)} run(s) had errors (see above and bench/.run/results.jsonl)", flush=True)
    return 0


def busy_warning(loads=None, ncpu=None):
    """A warning when other work is loading the machine (the figures would be noisy)."""
    load1 = (loads or os.getloadavg())[0]
    ncpu = ncpu or os.cpu_count() or 1
    if load1 > 0.5 * ncpu:
        return (f"the machine is busy (1-minute load average {load1:.1f} on {ncpu} CPUs): the figures will be "
                "noisy; stop other work (builds, tests) for a run that counts")
    return None


def summary(sc, rec):
    if rec.get("error"):
        return "ERROR: " + rec["error"].splitlines()[0]
    f = []
    if "msgs_per_s" in rec:
        f.append(f"{rec['msgs_per_s']:,.0f} msg/s")
    if "p50_us" in rec:
        f.append(f"p50 {rec['p50_us']:,.0f} µs p99 {rec.get('p99_us', 0):,.0f} µs")
    if "bytes_per_conn" in rec:
        f.append(f"{rec['bytes_per_conn']:,.0f} B/conn {rec.get('connects_per_s', 0):,.0f} conn/s")
    if "handshakes_per_s" in rec:
        f.append(f"{rec['handshakes_per_s']:,.0f} handshakes/s")
    if rec.get("lost"):
        f.append(f"LOST {rec['lost']}" + (" !!!" if sc.qos == 1 else ""))
    if rec.get("failed"):
        f.append(f"FAILED {rec['failed']}")
    if "gen_cpu_pct" in rec:
        f.append(f"gen {rec['gen_cpu_pct']:.0f}% broker {rec.get('broker_cpu_pct', 0):.0f}%")
    if rec.get("timed_out"):
        f.append("TIMED OUT")
    return ", ".join(f)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        cleanup()
        print(f"\nbench: error: {e}", file=sys.stderr)
        sys.exit(2)
