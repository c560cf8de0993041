"""Benchmark `icl-metarl generate`: steps/s with 1 worker against one worker per core, same settings.

Times the whole call (pool start-up included), checks both runs wrote identical shards, prints figures.
Usage: python scripts/bench_generate.py [--suite ML1:reach-v3] [--trials 16] [--episode-length 250]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

from icl_metarl.incontext.histories import GenerateConfig, default_workers, generate


def timed(cfg: GenerateConfig, out: str) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = generate(cfg, out, progress=False)
    return time.perf_counter() - start, manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--episode-length", type=int, default=250)
    p.add_argument("--trials-per-shard", type=int, default=4)
    args = p.parse_args()
    cfg = GenerateConfig(suite=args.suite, trials=args.trials, episodes_per_trial=args.episodes,
                         episode_length=args.episode_length, trials_per_shard=args.trials_per_shard)
    steps = cfg.trials * cfg.episodes_per_trial * cfg.episode_length
    cores = default_workers()
    print(f"{cfg.suite}: {cfg.trials} trials x {cfg.episodes_per_trial} episodes x {cfg.episode_length} steps "
          f"= {steps} steps, {cfg.trials_per_shard} trials per shard; {cores} cores, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        base_s, base_m = timed(replace(cfg, workers=1), f"{tmp}/one")
        print(f"1 worker:        {base_s:6.1f} s  {steps / base_s:8,.0f} steps/s  (baseline)")
        par_s, par_m = timed(replace(cfg, workers=cores), f"{tmp}/all")
        print(f"{cores} workers:       {par_s:6.1f} s  {steps / par_s:8,.0f} steps/s  "
              f"x{base_s / par_s:.2f} against 1 worker")
        sha = lambda m: {k: r["sha256"] for k, r in m["shards"].items()}  # noqa: E731  (cpu_seconds differ)
        same = sha(base_m) == sha(par_m)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print(f"identical shards (sha256) from both runs: {same}")


if __name__ == "__main__":
    main()
