"""Our evaluator against Meta-World's own metalearning_evaluation, on the same tasks and env seeds.

    python scripts/compare_metaworld_eval.py [AGENT ...] --suite ML10 --tasks-per-env 10 -K 10 -E 3

Prints, for each agent (default: the oracle and random baselines; or checkpoint directories, e.g. an
in-context policy), the evaluation-episode success rate from (a) our evaluator,
(b) Meta-World's function called once per task (exact bookkeeping), (c) Meta-World's function with all
tasks in one vector env, as make_ml_envs builds it (its per-name bookkeeping; see docs/results.md).
"""

import argparse
import time

import numpy as np

from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents, trial_seed
from icl_metarl.harness.mw_adapter import evaluate_with_metaworld


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("agents", nargs="*", default=["oracle", "random"])
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--split", default="test")
    p.add_argument("--tasks", type=int, default=None, help="the first N tasks (default: all, or --tasks-per-env)")
    p.add_argument("--tasks-per-env", type=int, default=None)
    p.add_argument("-K", type=int, default=2)
    p.add_argument("-E", type=int, default=3)
    p.add_argument("--episode-length", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = EvalConfig(suite=a.suite, split=a.split, num_tasks=a.tasks, tasks_per_env=a.tasks_per_env,
                     adaptation_episodes=a.K, evaluation_episodes=a.E, episode_length=a.episode_length,
                     seeds=(a.seed,), progress=False).check()
    tasks = cfg.tasks()
    env_seeds = [trial_seed(a.seed, j) for j in range(len(tasks))]
    print(f"{a.suite} {a.split}, {len(tasks)} tasks, K={a.K} E={a.E}, episodes of {a.episode_length} steps, seed {a.seed}")
    for agent in load_agents(a.agents):
        name = agent.label
        t0 = time.perf_counter()
        res = evaluate([agent], cfg)
        ours = np.array([[r["success"] for r in res["records"] if r["task"] == j and r["phase"] == "evaluation"]
                         for j in range(len(tasks))], dtype=float)  # (tasks, E)
        t1 = time.perf_counter()
        mw = evaluate_with_metaworld(agent.agent, tasks, env_seeds, a.K, a.E, a.episode_length, a.seed)
        t2 = time.perf_counter()
        # All tasks in one vector env ends episodes in some trials only (terminate_on_success): only an
        # agent that can end episodes per trial (end_episodes) can be played that way.
        mw_one = (evaluate_with_metaworld(agent.agent, tasks, env_seeds, a.K, a.E, a.episode_length, a.seed,
                                          one_task_per_call=False) if hasattr(agent.agent, "end_episodes") else None)
        t3 = time.perf_counter()
        mw_tasks = np.array([c["success"] for c in mw["calls"]])
        se = np.sqrt(ours.mean() * (1 - ours.mean()) / ours.size + mw_tasks.mean() * (1 - mw_tasks.mean()) / ours.size)
        print(f"{name}: ours {ours.mean():.3f} ({ours.size} episodes, {t1 - t0:.0f} s) | "
              f"Meta-World, one task per call {mw['success']:.3f} ({t2 - t1:.0f} s) | "
              f"difference {ours.mean() - mw['success']:+.3f}, binomial s.e. of the difference {se:.3f} | "
              + (f"Meta-World, all tasks in one vector env {mw_one['success']:.3f} "
                 f"(counts only its first {a.E} episodes to end, {t3 - t2:.0f} s)" if mw_one else
                 "Meta-World, all tasks in one vector env: not played (the agent ends episodes in lockstep only)"))
        print(f"  per-task agreement (same success count of {a.E}): "
              f"{int(np.sum(np.isclose(ours.mean(1), mw_tasks)))}/{len(tasks)}")


if __name__ == "__main__":
    main()
