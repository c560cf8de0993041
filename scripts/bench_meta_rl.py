"""Time one gradient meta-RL iteration, split into sampling and learning, against raw environment stepping.

Runs `gradient_meta.meta_rl.meta_train` for a few iterations per algorithm (its log records the split)
and, in the same process, steps the same vector environment with random actions as the baseline.
Usage: python scripts/bench_meta_rl.py [--meta-batch 10] [--episode-length 100] [--iterations 3]
"""

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from gradient_meta.meta_rl import MetaRLConfig, meta_train
from icl_metarl.harness.suites import ACT_DIM, get_suite, make_trial_envs


def raw_steps_per_s(tasks, length: int, episodes: int) -> float:
    envs = make_trial_envs(tasks, length)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(episodes):
        envs.reset()
        for _ in range(length):
            envs.step(rng.uniform(-1, 1, (len(tasks), ACT_DIM)).astype(np.float32))
    s = time.perf_counter() - t0
    envs.close()
    return len(tasks) * length * episodes / s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta-batch", type=int, default=10)
    ap.add_argument("--episode-length", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    tasks = get_suite("ML1:reach-v3").tasks("train")[: args.meta_batch]
    torch.set_num_threads(1)
    raw = raw_steps_per_s(tasks, args.episode_length, 2)
    print(f"ML1:reach-v3, meta-batch {args.meta_batch}, episodes of {args.episode_length} steps, "
          f"1 support + 1 query episode per task (Reptile: no query episode), torch threads 1")
    print(f"raw vector-env stepping (random actions): {raw:.0f} steps/s")
    print(f"{'algo':10s} {'iter s':>7s} {'sample s':>9s} {'learn s':>8s} {'sampler steps/s':>16s} {'vs raw':>7s}")
    for algo in ("maml", "meta-sgd", "reptile"):
        cfg = MetaRLConfig(algo=algo, iterations=args.iterations, meta_batch=args.meta_batch,
                           episode_length=args.episode_length, inner_steps=3 if algo == "reptile" else 1)
        with tempfile.TemporaryDirectory() as d:
            log = meta_train(cfg, d, progress=False)[1:]  # the first iteration builds the environments
        sample = statistics.median(r["sample_s"] for r in log)
        learn = statistics.median(r["learn_s"] for r in log)
        steps = (cfg.adapt_episodes + cfg.resolved().query_episodes) * args.meta_batch * args.episode_length
        print(f"{algo:10s} {sample + learn:7.2f} {sample:9.2f} {learn:8.3f} {steps / sample:16.0f} "
              f"{steps / sample / raw:7.2f}")
    again = raw_steps_per_s(tasks, args.episode_length, 2)
    print(f"raw vector-env stepping again at the end: {again:.0f} steps/s (load drift on a shared machine)")


if __name__ == "__main__":
    main()
