"""Our evaluator against Meta-World's own metalearning_evaluation, on the same tasks and env seeds.

Prints, for the oracle and random baselines, the evaluation-episode success rate from (a) our evaluator,
(b) Meta-World's function called once per task (exact bookkeeping), (c) Meta-World's function with all
tasks in one vector env, as make_ml_envs builds it (its per-name bookkeeping; see docs/results.md).
"""

import argparse
import time

import numpy as np

from icl_metarl.harness.baselines import make_baseline
from icl_metarl.harness.evaluation import EvalAgent, EvalConfig, evaluate, trial_seed
from icl_metarl.harness.mw_adapter import evaluate_with_metaworld


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("-K", type=int, default=2)
    p.add_argument("-E", type=int, default=3)
    p.add_argument("--episode-length", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = EvalConfig(suite=a.suite, num_tasks=a.tasks, adaptation_episodes=a.K, evaluation_episodes=a.E,
                     episode_length=a.episode_length, seeds=(a.seed,), progress=False)
    tasks = cfg.tasks()
    env_seeds = [trial_seed(a.seed, j) for j in range(len(tasks))]
    print(f"{a.suite} test, {len(tasks)} tasks, K={a.K} E={a.E}, episodes of {a.episode_length} steps, seed {a.seed}")
    for name in ("oracle", "random"):
        t0 = time.perf_counter()
        res = evaluate([EvalAgent(name, make_baseline(name))], cfg)
        ours = np.array([[r["success"] for r in res["records"] if r["task"] == j and r["phase"] == "evaluation"]
                         for j in range(len(tasks))], dtype=float)  # (tasks, E)
        t1 = time.perf_counter()
        mw = evaluate_with_metaworld(make_baseline(name), tasks, env_seeds, a.K, a.E, a.episode_length, a.seed)
        t2 = time.perf_counter()
        mw_one = evaluate_with_metaworld(make_baseline(name), tasks, env_seeds, a.K, a.E, a.episode_length, a.seed,
                                         one_task_per_call=False)
        t3 = time.perf_counter()
        mw_tasks = np.array([c["success"] for c in mw["calls"]])
        se = np.sqrt(ours.mean() * (1 - ours.mean()) / ours.size + mw_tasks.mean() * (1 - mw_tasks.mean()) / ours.size)
        print(f"{name}: ours {ours.mean():.3f} ({ours.size} episodes, {t1 - t0:.0f} s) | "
              f"Meta-World, one task per call {mw['success']:.3f} ({t2 - t1:.0f} s) | "
              f"difference {ours.mean() - mw['success']:+.3f}, binomial s.e. of the difference {se:.3f} | "
              f"Meta-World, all tasks in one vector env {mw_one['success']:.3f} "
              f"(counts only its first {a.E} episodes to end, {t3 - t2:.0f} s)")
        print(f"  per-task agreement (same success count of {a.E}): "
              f"{int(np.sum(np.isclose(ours.mean(1), mw_tasks)))}/{len(tasks)}")


if __name__ == "__main__":
    main()
