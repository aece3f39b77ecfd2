"""Parses a metrics exposition with the Prometheus project's own Python
client (`prometheus_client`), independently of the crate that wrote it.

Usage: python3 metrics.py prometheus|openmetrics < EXPOSITION
Prints one JSON array of samples: [name, {label: value}, value].
A text the parser refuses makes it exit non-zero with the parser's error.
"""

import json
import sys

from prometheus_client.openmetrics import parser as openmetrics
from prometheus_client import parser as prometheus


def main():
    text = sys.stdin.read()
    parse = {
        "prometheus": prometheus.text_string_to_metric_families,
        "openmetrics": openmetrics.text_string_to_metric_families,
    }[sys.argv[1]]
    samples = []
    for family in parse(text):
        for sample in family.samples:
            samples.append([sample.name, dict(sample.labels), sample.value])
    json.dump(samples, sys.stdout)


if __name__ == "__main__":
    main()
