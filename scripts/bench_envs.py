"""Environment steps per second: one process (sync vector env) against N processes (async), same work.

    python scripts/bench_envs.py --suite ML1:reach-v3 --trials 10 --steps 500

Both runs play the same tasks with the same random actions for the same number of steps.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from icl_metarl.harness.suites import ACT_DIM, get_suite, make_trial_envs


def steps_per_second(tasks, steps: int, episode_length: int, mode: str) -> float:
    envs = make_trial_envs(tasks, episode_length=episode_length, seed=0, mode=mode)
    rng = np.random.default_rng(0)
    envs.reset()
    t0 = time.perf_counter()
    for t in range(steps):
        _, _, _, truncated, _ = envs.step(rng.uniform(-1, 1, (len(tasks), ACT_DIM)).astype(np.float32))
        if truncated.all():
            envs.reset()
    elapsed = time.perf_counter() - t0
    envs.close()
    return len(tasks) * steps / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--trials", type=int, default=10, help="parallel trials (one task each)")
    p.add_argument("--steps", type=int, default=500, help="steps per trial")
    p.add_argument("--episode-length", type=int, default=500)
    args = p.parse_args()
    tasks = get_suite(args.suite).tasks("test", 0)[: args.trials]
    cores = os.cpu_count() or 1
    sync = steps_per_second(tasks, args.steps, args.episode_length, "sync")
    asyn = steps_per_second(tasks, args.steps, args.episode_length, "async")
    print(f"{args.suite}: {len(tasks)} trials x {args.steps} steps, {cores} cores")
    print(f"  1 process (sync):            {sync:8.0f} env steps/s")
    print(f"  {len(tasks)} processes (async):      {asyn:8.0f} env steps/s   ({asyn / sync:.2f}x)")


if __name__ == "__main__":
    main()
