#!/usr/bin/env python3
"""Plots a hub's RSS and data dir size over a pruning soak, before and after.

Usage (BENCHMARKS.md, "Storage soak", has the runs that make the inputs):

    python3 docs/plot_storage_soak.py --before before.csv --after after.csv \
        -o docs/storage-soak.png

Each input has one line per sample, `unix_secs,rss_kb,open_fds,data_dir_kb`
(what the soak script's monitor writes every few seconds). Needs matplotlib.
"""

import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    rows = [r for r in csv.reader(open(path)) if len(r) == 4 and r[1]]
    t0 = int(rows[0][0])
    secs = [int(r[0]) - t0 for r in rows]
    rss = [int(r[1]) / 1024 for r in rows]
    disk = [int(r[3]) / 1024 for r in rows]
    return secs, rss, disk


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("-o", "--output", default="docs/storage-soak.png")
    args = parser.parse_args()
    fig, (ax_rss, ax_disk) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, path, style in (
        ("before (one sled batch per group)", args.before, "r-"),
        ("after (ring slots, bounded sled batches)", args.after, "g-"),
    ):
        secs, rss, disk = read(path)
        ax_rss.plot(secs, rss, style, label=label)
        ax_disk.plot(secs, disk, style, label=label)
    for ax, what in ((ax_rss, "hub RSS (MB)"), (ax_disk, "data dir (MB)")):
        ax.set_xlabel("seconds of publishing")
        ax.set_ylabel(what)
        ax.set_yscale("log")
        ax.set_ylim(bottom=5)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(
        "200 rooms x 1 publisher (window 16), history.max_per_room = 100: "
        "20 000 messages retained"
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
