"""What the command line's subcommands run once their flags are parsed: printing a suite, evaluating
agents and writing the report, checking the evaluator against Meta-World's own, probing a checkpoint.
Imported only when a command runs.

Not for: parsing (``cli.py``) or the work itself (the harness, the learners, the probes).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
from accelerate import PartialState

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig, load_agents, load_results, trial_seed
from icl_metarl.harness.evaluation import evaluate as evaluate_agents
from icl_metarl.harness.mw_adapter import evaluate_with_metaworld
from icl_metarl.harness.report import write_report
from icl_metarl.harness.statistics import normal_interval
from icl_metarl.harness.suites import (
    HOLDOUT,
    check_action_repeat,
    check_episode_length,
    check_split,
    env_names,
    get_suite,
)
from icl_metarl.probes.config import ProbeConfig
from icl_metarl.probes.probe import probe as probe_checkpoint
from icl_metarl.study.expert_check import check


def suites(name: str | None, options) -> None:
    """``icl-metarl suites [NAME]``: every suite, or one with its task counts (and ``--check``)."""
    for split in options.split:
        check_split(split)
    for k in options.action_repeats:
        check_action_repeat(k)
    check_episode_length(options.episode_length)
    if options.check < 0:
        raise UsageError(f"--check must be >= 0 tasks, got {options.check}")
    if name is None:
        if options.check:
            raise UsageError("--check plays one suite: name it, e.g. `icl-metarl suites ML10 --check 10`")
        for suite_name in ("ML10", "ML45"):
            s = get_suite(suite_name)
            print(f"{suite_name}: {len(s.train_envs)} train environments, {len(s.test_envs)} test environments")
            print(f"  test: {', '.join(s.test_envs)}")
            held = get_suite(suite_name + HOLDOUT)
            print(f"{held.name}: {suite_name} with {', '.join(held.validation_envs)} held out of training as its "
                  f"validation environments (choose recipes there; test with {suite_name})")
        print(f"ML1:<env>: 50 train and 50 test goals of one environment; env is one of {len(env_names())}:")
        for i in range(0, len(env_names()), 6):
            print("  " + ", ".join(env_names()[i : i + 6]))
        print("`icl-metarl suites NAME` shows one suite with its task counts.")
        return
    s = get_suite(name)
    print(f"{s.name}")
    for split in ("train", "validation", "test"):
        tasks = s.tasks(split, options.seed)
        print(f"  {split}: {len(tasks)} tasks over {len(s.envs(split))} environments (seed {options.seed})")
        print(f"    {', '.join(s.envs(split))}")
    if options.check:
        check(s.name, options)


#: how long the first process to finish its share waits for the last at the barrier: shares of the
#: same number of batches can end hours apart (agents differ in cost); if a process dies, the launcher
#: ends the others at once
_SHARES_APART = timedelta(hours=24)


def launched_processes() -> PartialState | None:
    """The processes of an ``accelerate launch`` for the evaluator to split its trials over, or None alone.

    Agents act on CPUs, so the barrier is gloo's; one process leaves accelerate's state alone (a later
    Accelerator in it may want a GPU)."""
    return PartialState(cpu=True, timeout=_SHARES_APART) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def evaluate(specs: list[str], config: EvalConfig, non_adaptive: bool, bootstrap: int, options: dict, out,
             replay_best: bool = False) -> None:
    """``icl-metarl evaluate``: every agent on the same tasks and seeds; results.json, report.md, plots.
    Under ``accelerate launch`` every process plays a share of the trials and the main one reports."""
    if bootstrap < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {bootstrap}")
    if replay_best and (config.adaptation_episodes < 1 or config.evaluation_episodes < 1):
        raise UsageError(f"--replay-best replays an adaptation episode in the evaluation episodes: it needs -K >= 1 "
                         f"and -E >= 1, got -K {config.adaptation_episodes} -E {config.evaluation_episodes}")
    config.tasks()  # a bad --tasks fails before any checkpoint is loaded
    agents = load_agents(specs, non_adaptive=non_adaptive, options=options,
                         replay_best_after=config.adaptation_episodes if replay_best else 0)
    results = evaluate_agents(agents, config, out, launched_processes())
    if results is None:  # another process than the main one: its share is in out/ranks
        return
    report = write_report(results, out, bootstrap)
    for f in results["failures"]:
        print(f"agent {f['agent']} failed at seed {f['seed']}: {f['error']} (earlier records kept)", file=sys.stderr)
    print(f"wrote {out}/results.json and {report}")


def report(path: str, out: str | None, bootstrap: int) -> None:
    """``icl-metarl report``: report.md and the plots of an evaluation again, from its results.json (or the
    results.json.gz committed under results/), without playing an episode: after the report gains a
    section, or into another directory."""
    if bootstrap < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {bootstrap}")
    results = load_results(path)
    where = Path(out) if out else (Path(path) if Path(path).is_dir() else Path(path).parent)
    where.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_report(results, where, bootstrap)}")


def probe(checkpoint: str, config: ProbeConfig, out) -> None:
    """``icl-metarl probe``: attention and causal probes of an in-context checkpoint."""
    result = probe_checkpoint(checkpoint, config=config, progress=print)
    paths = result.save(out)
    print(f"probe took {result.timing['total_s']:.0f} s; wrote {', '.join(Path(p).name for p in paths)} to {out}")


def crosscheck(specs: list[str], config: EvalConfig) -> None:
    """``icl-metarl crosscheck``: each agent's evaluation-episode success from (a) our evaluator, (b) Meta-World's
    ``metalearning_evaluation`` called once per task (exact bookkeeping), (c) Meta-World's function with all
    tasks in one vector env, as ``make_ml_envs`` builds it (its per-name bookkeeping; docs/results.md)."""
    (seed,) = config.seeds
    tasks = config.tasks()
    env_seeds = [trial_seed(seed, j) for j in range(len(tasks))]
    K, E, length = config.adaptation_episodes, config.evaluation_episodes, config.episode_length
    print(f"{config.suite} {config.split}, {len(tasks)} tasks, K={K} E={E}, episodes of {length} steps, seed {seed}")
    for agent in load_agents(specs):
        t0 = time.perf_counter()
        res = evaluate_agents([agent], config)
        ours = np.array([[r["success"] for r in res["records"] if r["task"] == j and r["phase"] == "evaluation"]
                         for j in range(len(tasks))], dtype=float)  # (tasks, E)
        t1 = time.perf_counter()
        mw = evaluate_with_metaworld(agent.agent, tasks, env_seeds, K, E, length, seed)
        t2 = time.perf_counter()
        # All tasks in one vector env ends episodes in some trials only (terminate_on_success): only an
        # agent that can end episodes per trial (end_episodes) can be played that way.
        mw_one = (evaluate_with_metaworld(agent.agent, tasks, env_seeds, K, E, length, seed, one_task_per_call=False)
                  if hasattr(agent.agent, "end_episodes") else None)
        t3 = time.perf_counter()
        mw_tasks = np.array([c["success"] for c in mw["calls"]])
        diff, half = map(float, normal_interval(ours.mean(1) - mw_tasks))  # paired by task (same seeds)
        print(f"{agent.label}: ours {ours.mean():.3f} ({ours.size} episodes, {t1 - t0:.0f} s) | "
              f"Meta-World, one task per call {mw['success']:.3f} ({t2 - t1:.0f} s) | "
              f"difference {diff:+.3f} +- {half:.3f} (95%, paired by task) | "
              + (f"Meta-World, all tasks in one vector env {mw_one['success']:.3f} "
                 f"(counts only its first {E} episodes to end, {t3 - t2:.0f} s)" if mw_one else
                 "Meta-World, all tasks in one vector env: not played (the agent ends episodes in lockstep only)"))
        print(f"  per-task agreement (same success count of {E}): "
              f"{int(np.sum(np.isclose(ours.mean(1), mw_tasks)))}/{len(tasks)}")
