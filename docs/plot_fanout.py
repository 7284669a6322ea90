#!/usr/bin/env python3
"""Plots deliveries/s against room size from `roomhub load --json` summaries.

Usage (see BENCHMARKS.md for the runs that make the inputs):

    python3 docs/plot_fanout.py results/fanout-*.json -o docs/bench-fanout.png

Each input is one run: one room, one publisher at max rate. Runs are grouped
by room size (`clients`); the plot shows the mean of each group and, when a
size was run more than once, its min-max range. Needs matplotlib.
"""

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The reference relay's A figure (1 room x 1000, same method), for scale.
RELAY_A = (5.3e6, 5.8e6)
TARGET_A = 4e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="roomhub load --json outputs")
    parser.add_argument("-o", "--output", default="docs/bench-fanout.png")
    parser.add_argument("--title", default="roomhub fan-out: 1 room, 1 publisher (window 64), 100-byte data")
    args = parser.parse_args()

    by_size = defaultdict(list)
    for path in args.runs:
        with open(path) as f:
            run = json.load(f)
        by_size[run["clients"]].append(run["deliveries_per_sec"])
    sizes = sorted(by_size)
    means = [sum(by_size[s]) / len(by_size[s]) for s in sizes]
    lows = [m - min(by_size[s]) for s, m in zip(sizes, means)]
    highs = [max(by_size[s]) - m for s, m in zip(sizes, means)]

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.errorbar(sizes, [m / 1e6 for m in means],
                yerr=[[v / 1e6 for v in lows], [v / 1e6 for v in highs]],
                marker="o", capsize=4, label="roomhub (measured)")
    for s, m in zip(sizes, means):
        ax.annotate(f"{m / 1e6:.2f} M/s", (s, m / 1e6), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=9)
    ax.axhspan(RELAY_A[0] / 1e6, RELAY_A[1] / 1e6, color="tab:green", alpha=0.15,
               label="hand-written Rust relay, 1000 subscribers")
    ax.axhline(TARGET_A / 1e6, color="tab:red", linestyle="--", label="target at 1000 subscribers (4 M/s)")
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("room size (members, the publisher included)")
    ax.set_ylabel("deliveries per second (millions)")
    ax.set_ylim(bottom=0, top=max(6.5, max(means) / 1e6 * 1.2))
    ax.set_title(args.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
