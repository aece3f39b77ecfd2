#!/usr/bin/env python3
"""Prints the markdown table of docs/benchmarks.md from workload JSON lines.

Usage: python3 benches/table.py docs/bench/workload.jsonl
Standard library only.
"""
import json
import sys

COLUMNS = [
    ("sync", "sync", str),
    ("threads", "T", str),
    ("engine_events_per_s", "engine ev/s", "{:,.0f}".format),
    ("baseline_events_per_s", "baseline, commit per event", "{:,.0f}".format),
    ("ratio", "ratio", "{:.2f}".format),
    ("baseline_per_step_events_per_s", "baseline, commit per step", "{:,.0f}".format),
    ("ratio_per_step", "ratio", "{:.2f}".format),
    ("same_table_per_step_events_per_s", "same commits into the log's table", "{:,.0f}".format),
    ("ratio_same_table", "ratio", "{:.2f}".format),
    ("single_stream_baseline_events_per_s", "single stream", "{:,.0f}".format),
    ("ratio_to_single_stream", "× single stream", "{:.2f}".format),
    ("replay_events_per_s", "replay ev/s", "{:,.0f}".format),
    ("raw_replay_events_per_s", "raw replay ev/s", "{:,.0f}".format),
    ("replay_ratio", "ratio", "{:.2f}".format),
    ("verify_events_per_s", "verify ev/s", "{:,.0f}".format),
    ("verify_ratio", "verify / raw replay", "{:.2f}".format),
]


def main(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(fmt(row[key]) for key, _, fmt in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
