"""What the command line's subcommands run once their flags are parsed: printing a suite, evaluating
agents and writing the report, probing a checkpoint. Imported only when a command runs.

Not for: parsing (``cli.py``) or the work itself (the harness, the learners, the probes).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

from accelerate import PartialState

from icl_metarl.harness.baselines import check_suite
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig, load_agents
from icl_metarl.harness.evaluation import evaluate as evaluate_agents
from icl_metarl.harness.report import write_report
from icl_metarl.harness.suites import HOLDOUT, check_episode_length, check_split, env_names, get_suite
from icl_metarl.probes.config import ProbeConfig
from icl_metarl.probes.probe import probe as probe_checkpoint


def suites(name: str | None, options) -> None:
    """``icl-metarl suites [NAME]``: every suite, or one with its task counts (and ``--check``)."""
    check_split(options.split)
    check_episode_length(options.episode_length)
    if options.check < 0:
        raise UsageError(f"--check must be >= 0 tasks, got {options.check}")
    if name is None:
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
        tasks = s.tasks(options.split, options.seed)[: options.check]
        r = check_suite(tasks, options.episode_length, seed=options.seed)
        print(f"check on {len(tasks)} {options.split} tasks, episodes of {options.episode_length} steps "
              f"(goal hidden in every observation: {r['goal_hidden']}):")
        print(f"  expert told the goal: success {r['expert_success']:.2f}; random: success {r['random_success']:.2f}; "
              f"{r['steps_per_s']:.0f} env steps/s")


#: how long the first process to finish its share waits for the last at the barrier: shares of the
#: same number of batches can end hours apart (agents differ in cost); if a process dies, the launcher
#: ends the others at once
_SHARES_APART = timedelta(hours=24)


def launched_processes() -> PartialState | None:
    """The processes of an ``accelerate launch`` for the evaluator to split its trials over, or None alone.

    Agents act on CPUs, so the barrier is gloo's; one process leaves accelerate's state alone (a later
    Accelerator in it may want a GPU)."""
    return PartialState(cpu=True, timeout=_SHARES_APART) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def evaluate(specs: list[str], config: EvalConfig, non_adaptive: bool, bootstrap: int, options: dict, out) -> None:
    """``icl-metarl evaluate``: every agent on the same tasks and seeds; results.json, report.md, plots.
    Under ``accelerate launch`` every process plays a share of the trials and the main one reports."""
    if bootstrap < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {bootstrap}")
    config.tasks()  # a bad --tasks fails before any checkpoint is loaded
    agents = load_agents(specs, non_adaptive=non_adaptive, options=options)
    results = evaluate_agents(agents, config, out, launched_processes())
    if results is None:  # another process than the main one: its share is in out/ranks
        return
    report = write_report(results, out, bootstrap)
    for f in results["failures"]:
        print(f"agent {f['agent']} failed at seed {f['seed']}: {f['error']} (earlier records kept)", file=sys.stderr)
    print(f"wrote {out}/results.json and {report}")


def probe(checkpoint: str, config: ProbeConfig, out) -> None:
    """``icl-metarl probe``: attention and causal probes of an in-context checkpoint."""
    result = probe_checkpoint(checkpoint, config=config, progress=print)
    paths = result.save(out)
    print(f"probe took {result.timing['total_s']:.0f} s; wrote {', '.join(Path(p).name for p in paths)} to {out}")
