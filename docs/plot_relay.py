#!/usr/bin/env python3
"""Plots roomhub against the hand-written relay from the JSON that
benches/relay_compare.py prints: each scenario's figure as a ratio to the
relay's (best run of each), with the target as a line."""
import argparse, json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Scenario, figure, better when higher, target ratio.
FIGURES = [
    ("A", "deliveries_per_sec", True, 0.9),
    ("B", "p99_ms", False, 1.25),
    ("C", "p99_ms", False, 1.0),
    ("D", "kib_per_connection", False, 1.2),
]
VARIANTS = ["batched", "sync", "batched compressed"]


def best(runs, key, higher):
    values = [r[key] for r in runs if r.get(key) is not None]
    return (max if higher else min)(values) if values else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("-o", "--out", default="docs/relay-ratio.png")
    args = ap.parse_args()
    runs = json.load(open(args.json))["runs"]
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(12, 3.6))
    for ax, (scenario, key, higher, target) in zip(axes, FIGURES):
        relay = best(runs.get(f"{scenario} relay", []), key, higher)
        names, ratios = [], []
        for variant in VARIANTS:
            mine = best(runs.get(f"{scenario} {variant}", []), key, higher)
            if mine is not None and relay:
                names.append(variant.replace(" compressed", "\n+deflate"))
                ratios.append(mine / relay)
        ax.bar(names, ratios, color="#4c72b0")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(target, color="#c44e52", linestyle="--", linewidth=1, label=f"target {target}×")
        what = {"deliveries_per_sec": "deliveries/s", "p99_ms": "p99 latency",
                "kib_per_connection": "idle KiB/conn"}[key]
        ax.set_title(f"{scenario}: {what}\n({'higher' if higher else 'lower'} is better)")
        ax.set_ylabel("roomhub / relay")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
