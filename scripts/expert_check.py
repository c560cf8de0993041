"""The scripted expert told the goal (the oracle baseline) on every environment of a suite: success and when.

    python scripts/expert_check.py --suite ML10 --splits train test --tasks-per-env 10 --out expert/ML10
    python scripts/expert_check.py --suite ML10 --action-repeats 1 2 3 4 5 --out results/expert-ml10-k

With several ``--action-repeats`` (decision intervals k: the expert acts every k-th simulator step and
its action is held between) each k is played on the same tasks and a last table gives each
environment's success at every k relative to k = 1, and the largest k at which every environment keeps
at least ``--keep`` of its k = 1 success.

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


def results_for(suite: str, split: str, tasks_per_env: int, length: int, out: Path, action_repeat: int = 1) -> dict:
    if (out / "results.json").is_file():
        return load_results(out)
    cfg = EvalConfig(suite=suite, split=split, adaptation_episodes=0, evaluation_episodes=1,
                     episode_length=length, seeds=(0,), tasks_per_env=tasks_per_env, progress=False,
                     action_repeat=action_repeat).check()
    return evaluate(load_agents(["oracle"]), cfg, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--splits", nargs="+", default=["train", "test"])
    p.add_argument("--tasks-per-env", type=int, default=10)
    p.add_argument("--episode-length", type=int, default=500)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--action-repeats", type=int, nargs="+", default=[1])
    p.add_argument("--keep", type=float, default=0.95)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    below = []
    success_at: dict[tuple[str, str], dict[int, float]] = {}
    print("| k | split | environment | tasks | success | steps to first success: median | p90 | max |")
    print("|---|---|---|---|---|---|---|---|")
    for k, split in ((k, split) for k in args.action_repeats for split in args.splits):
        out = Path(args.out) / split if args.action_repeats == [1] else Path(args.out) / f"k{k}" / split
        r = results_for(args.suite, split, args.tasks_per_env, args.episode_length, out, k)
        by_env: dict[str, list] = {}
        for rec in r["records"]:
            by_env.setdefault(rec["env_name"], []).append(rec)
        for env in sorted(by_env):
            recs = by_env[env]
            success = np.mean([x["success"] for x in recs])
            steps = np.array([x["steps_to_success"] for x in recs if x["success"]])
            stats = (f"{np.median(steps):.0f} | {np.percentile(steps, 90):.0f} | {steps.max():.0f}" if len(steps)
                     else "- | - | -")
            print(f"| {k} | {split} | {env} | {len(recs)} | {success:.2f} | {stats} |")
            success_at.setdefault((split, env), {})[k] = float(success)
            if success < args.threshold:
                below.append(f"{env} ({split}, k={k}: {success:.2f})")
    print(f"\nbelow {args.threshold}: {', '.join(below) if below else 'none'}")
    if len(args.action_repeats) > 1:
        ks = args.action_repeats
        print(f"\n| split | environment | {' | '.join(f'k={k}' for k in ks)} | kept (>= {args.keep} of k={ks[0]}) up to |")
        print(f"|---|---|{'---|' * len(ks)}---|")
        worst = max(ks)
        for (split, env), by_k in sorted(success_at.items()):
            base = by_k[ks[0]]
            keeps = [k for k in ks if by_k[k] >= args.keep * base]
            up_to = max((k for k in ks if all(j in keeps for j in ks if j <= k)), default=ks[0])
            worst = min(worst, up_to)
            print(f"| {split} | {env} | {' | '.join(f'{by_k[k]:.2f}' for k in ks)} | k={up_to} |")
        print(f"\nevery environment keeps >= {args.keep} of its k={ks[0]} success up to k={worst}")


if __name__ == "__main__":
    main()
