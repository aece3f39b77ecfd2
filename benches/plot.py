#!/usr/bin/env python3
"""Plots throughput versus threads from workload JSON lines, as SVG on stdout.

Usage: python3 benches/plot.py docs/bench/workload.jsonl > docs/throughput.svg
Standard library only.
"""
import json
import sys

SERIES = [
    ("engine_events_per_s", "engine", "#1f77b4", ""),
    ("baseline_events_per_s", "raw SQLite, one commit per event", "#d62728", "6,4"),
    ("baseline_per_step_events_per_s", "raw SQLite, one commit per step", "#2ca02c", "2,3"),
]
W, H, PAD_L, PAD_R, PAD_T, PAD_B, GAP = 880, 400, 70, 20, 50, 110, 60


def panel(rows, x0, width, title):
    threads = sorted({r["threads"] for r in rows})
    top = max(r[key] for r in rows for key, *_ in SERIES) * 1.1
    plot_h = H - PAD_T - PAD_B

    def sx(t):
        if len(threads) == 1:
            return x0 + width / 2
        return x0 + (threads.index(t)) / (len(threads) - 1) * width

    def sy(v):
        return PAD_T + plot_h - v / top * plot_h

    out = [f'<text x="{x0 + width / 2}" y="{PAD_T - 18}" text-anchor="middle" font-weight="bold">{title}</text>']
    for i in range(6):
        v = top * i / 5
        y = sy(v)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{v / 1000:.0f}k</text>')
    for t in threads:
        out.append(f'<text x="{sx(t):.1f}" y="{PAD_T + plot_h + 18}" text-anchor="middle" font-size="12">T={t}</text>')
    for key, _, color, dash in SERIES:
        points = [(sx(r["threads"]), sy(r[key])) for r in sorted(rows, key=lambda r: r["threads"])]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        for x, y in points:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
    return out


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    modes = [m for m in ("FULL", "NORMAL") if any(r["sync"] == m for r in rows)]
    width = (W - PAD_L - PAD_R - GAP * (len(modes) - 1)) / len(modes)
    body = []
    for i, mode in enumerate(modes):
        x0 = PAD_L + i * (width + GAP)
        body += panel([r for r in rows if r["sync"] == mode], x0, width, f"synchronous={mode}: events/s vs threads")
    legend_y = H - 40
    for i, (_, label, color, dash) in enumerate(SERIES):
        x = PAD_L + i * 270
        body.append(f'<line x1="{x}" y1="{legend_y}" x2="{x + 30}" y2="{legend_y}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        body.append(f'<text x="{x + 36}" y="{legend_y + 4}" font-size="12">{label}</text>')
    print(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">')
    print(f'<rect width="{W}" height="{H}" fill="white"/>')
    print("\n".join(body))
    print("</svg>")


if __name__ == "__main__":
    main()
