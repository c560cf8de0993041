"""Benchmark reading training windows when the shards outnumber the memory maps allowed open at once.

Histories open each shard field's memory map on access and keep at most a bounded number open (each
holds a file descriptor). This reads the same random windows of one histories directory twice, in
alternating rounds: with room for every map (every access after the first is a cache hit, as when all
maps stayed open) and with room for only ``--limit`` maps (random windows over many shards then map and
unmap files constantly), checks both read identical windows, and prints windows/s and their ratio.
Usage: python scripts/bench_windows.py [--shards 64] [--limit 16] [--windows 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from icl_metarl.incontext import shards
from icl_metarl.incontext.histories import GenerateConfig, generate
from icl_metarl.incontext.windows import WindowDataset


def read(directory: Path, limit: int, order: np.ndarray) -> tuple[float, list]:
    shards._OPEN_MAPS = shards._MapCache(limit)
    ds = WindowDataset(directory, 2, verify=False)
    start = time.perf_counter()
    windows = [ds[int(i) % len(ds)] for i in order]
    return len(order) / (time.perf_counter() - start), windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--limit", type=int, default=16, help="memory maps open at once in the bounded reading")
    p.add_argument("--windows", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--episode-length", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GenerateConfig(suite="ML1:reach-v3", trials=args.shards, episodes_per_trial=4,
                             episode_length=args.episode_length, trials_per_shard=1, workers=1)
        generate(cfg, Path(tmp) / "h", progress=False)
        order = np.random.default_rng(0).integers(0, 1 << 30, args.windows)
        rates: dict[str, list[float]] = {"all maps open": [], f"{args.limit} maps open": []}
        for _ in range(args.rounds):
            open_rate, a = read(Path(tmp) / "h", 1 << 20, order)
            bounded_rate, b = read(Path(tmp) / "h", args.limit, order)
            assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x), "the two readings differ"
            rates["all maps open"].append(open_rate)
            rates[f"{args.limit} maps open"].append(bounded_rate)
    print(f"{args.shards} shards x 8 fields, windows of 2 episodes x {args.episode_length} steps, "
          f"{args.windows} random windows, {args.rounds} alternating rounds (median):")
    medians = {k: statistics.median(v) for k, v in rates.items()}
    for name, rate in medians.items():
        print(f"  {name:>16}: {rate:8.0f} windows/s")
    bounded, full = medians[f"{args.limit} maps open"], medians["all maps open"]
    print(f"  ratio bounded / all open: {bounded / full:.2f}")


if __name__ == "__main__":
    main()
