"""The scripted expert told the goal (the oracle baseline) on every environment of a suite: success and when.

    python scripts/expert_check.py --suite ML10 --splits train test --tasks-per-env 10 --out expert/ML10

Plays the oracle through the shared evaluator (one evaluation episode per task, no adaptation episodes,
``--episode-length`` steps, evaluation seed 0) on the first N tasks of each environment of each split,
writes each split's results.json/report.md under ``--out/<split>`` (an existing one is read, not replayed),
then prints per environment: tasks, success, and the steps to first success (median, 90th percentile,
max), and lists the environments whose success is below ``--threshold``. The steps tell which episode
length a study may use without cutting off the expert.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents, load_results


def results_for(suite: str, split: str, tasks_per_env: int, length: int, out: Path) -> dict:
    if (out / "results.json").is_file():
        return load_results(out)
    cfg = EvalConfig(suite=suite, split=split, adaptation_episodes=0, evaluation_episodes=1,
                     episode_length=length, seeds=(0,), tasks_per_env=tasks_per_env, progress=False).check()
    return evaluate(load_agents(["oracle"]), cfg, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--splits", nargs="+", default=["train", "test"])
    p.add_argument("--tasks-per-env", type=int, default=10)
    p.add_argument("--episode-length", type=int, default=500)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    below = []
    print("| split | environment | tasks | success | steps to first success: median | p90 | max |")
    print("|---|---|---|---|---|---|---|")
    for split in args.splits:
        r = results_for(args.suite, split, args.tasks_per_env, args.episode_length, Path(args.out) / split)
        by_env: dict[str, list] = {}
        for rec in r["records"]:
            by_env.setdefault(rec["env_name"], []).append(rec)
        for env in sorted(by_env):
            recs = by_env[env]
            success = np.mean([x["success"] for x in recs])
            steps = np.array([x["steps_to_success"] for x in recs if x["success"]])
            stats = (f"{np.median(steps):.0f} | {np.percentile(steps, 90):.0f} | {steps.max():.0f}" if len(steps)
                     else "- | - | -")
            print(f"| {split} | {env} | {len(recs)} | {success:.2f} | {stats} |")
            if success < args.threshold:
                below.append(f"{env} ({split}: {success:.2f})")
    print(f"\nbelow {args.threshold}: {', '.join(below) if below else 'none'}")


if __name__ == "__main__":
    main()
