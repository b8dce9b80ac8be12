#!/usr/bin/env python3
"""Paired per-round ratios from one or more sluice-load reports.

The machine's speed drifts by a third within minutes, so setups are compared
inside each round (they run back to back) and the ratios' median is taken over
the rounds, rather than dividing medians taken over different minutes.

    python3 benches/paired.py benches/results/load-<stamp>.md [more reports]

Prints, for Sluice against the pass-through modules and the baseline build:
Envoy CPU per request (raw, and scaled by the upstream's CPU in the same
round), throughput and p99 ratios, and the A/B share of Sluice's cost over
the pass-through module. Setups absent from a round are skipped.
"""
import re
import statistics
import sys

ROW = re.compile(
    r"\| (\d+) \| ([\w-]+) \| (\d+) \| \d+ \| \d+ \| (\d+) \| \d+ \| ([\d.]+) \| ([\d.]+) \|"
)


def rounds(paths):
    found = {}
    for path in paths:
        text = open(path, encoding="utf-8").read()
        section = text[text.index("## Every run"):]
        for line in section.splitlines():
            match = ROW.match(line)
            if match:
                key = (path, int(match.group(1)))
                found.setdefault(key, {})[match.group(2)] = {
                    "rps": int(match.group(3)),
                    "p99": int(match.group(4)),
                    "cpu": float(match.group(5)),
                    "up": float(match.group(6)),
                }
    return found


def scaled(run, setup):
    return run[setup]["cpu"] / run[setup]["up"]


CHECKS = [
    ("Envoy CPU, sluice ÷ passthrough-raw (no-op module)",
     lambda r: r["sluice"]["cpu"] / r["passthrough-raw"]["cpu"]),
    ("  scaled by the upstream's CPU",
     lambda r: scaled(r, "sluice") / scaled(r, "passthrough-raw")),
    ("Envoy CPU, sluice ÷ passthrough (SDK)",
     lambda r: r["sluice"]["cpu"] / r["passthrough"]["cpu"]),
    ("Envoy CPU, sluice-steer-all ÷ passthrough-raw",
     lambda r: r["sluice-steer-all"]["cpu"] / r["passthrough-raw"]["cpu"]),
    ("  scaled by the upstream's CPU",
     lambda r: scaled(r, "sluice-steer-all") / scaled(r, "passthrough-raw")),
    ("cost over passthrough, sluice ÷ sluice-baseline",
     lambda r: (r["sluice"]["cpu"] - r["passthrough"]["cpu"])
     / (r["sluice-baseline"]["cpu"] - r["passthrough"]["cpu"])),
    ("  scaled by the upstream's CPU",
     lambda r: (scaled(r, "sluice") - scaled(r, "passthrough"))
     / (scaled(r, "sluice-baseline") - scaled(r, "passthrough"))),
    ("throughput, sluice ÷ passthrough", lambda r: r["sluice"]["rps"] / r["passthrough"]["rps"]),
    ("throughput, sluice ÷ passthrough-raw",
     lambda r: r["sluice"]["rps"] / r["passthrough-raw"]["rps"]),
    ("throughput, sluice-calls ÷ passthrough",
     lambda r: r["sluice-calls"]["rps"] / r["passthrough"]["rps"]),
    ("p99, sluice ÷ passthrough", lambda r: r["sluice"]["p99"] / r["passthrough"]["p99"]),
    ("p99, sluice ÷ passthrough-raw", lambda r: r["sluice"]["p99"] / r["passthrough-raw"]["p99"]),
    ("µs: sluice − passthrough-raw", lambda r: r["sluice"]["cpu"] - r["passthrough-raw"]["cpu"]),
    ("µs: sluice-calls − passthrough-raw (the calls)",
     lambda r: r["sluice-calls"]["cpu"] - r["passthrough-raw"]["cpu"]),
    ("µs: sluice − sluice-calls (Sluice's own part)",
     lambda r: r["sluice"]["cpu"] - r["sluice-calls"]["cpu"]),
    ("µs: sluice-steer-all − sluice (stable written too)",
     lambda r: r["sluice-steer-all"]["cpu"] - r["sluice"]["cpu"]),
    ("µs: sluice-baseline − sluice", lambda r: r["sluice-baseline"]["cpu"] - r["sluice"]["cpu"]),
]


def main(paths):
    found = rounds(paths)
    print(f"{len(found)} rounds from {len(paths)} report(s); median (min–max) over the rounds")
    for name, ratio in CHECKS:
        values = []
        for run in found.values():
            try:
                values.append(ratio(run))
            except (KeyError, ZeroDivisionError):
                pass
        if values:
            print(f"{name:52s} {statistics.median(values):7.3f}  "
                  f"({min(values):.3f}–{max(values):.3f}, {len(values)} rounds)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
