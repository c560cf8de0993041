"""The tasks a histories directory plays: the pool (benchmark tasks or fresh ones of the train
environments, never a test or validation task) and which pool task each trial plays.

Not for: how a trial is played (``noise.py``, ``recording.py``) or written (``histories.py``).
"""

from __future__ import annotations

import numpy as np

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.suites import get_suite, parse_task_pool, sample_new_tasks
from icl_metarl.incontext.config import GenerateConfig


def derived_seed(seed: int, purpose: int, *more: int) -> int:
    """An independent integer seed for one use of the run's seed (task order, pool, a shard...)."""
    return int(np.random.SeedSequence([seed, purpose, *more]).generate_state(1)[0])


def build_task_pool(cfg: GenerateConfig) -> tuple[list, list[int]]:
    """The pool of tasks (list of TaskSpec) and the pool index each trial plays: (tasks, trial_tasks).

    New tasks come from each train environment's own sampler and never equal a test task of the same
    benchmark seed; the check below holds for the benchmark pool too.
    """
    suite = get_suite(cfg.suite)
    pool = parse_task_pool(cfg.task_pool)
    excluded = suite.training_exclusions(cfg.suite_seed)  # test and validation tasks
    if pool == "benchmark":
        tasks = suite.tasks(cfg.split, cfg.suite_seed)
    else:
        count = cfg.trials if pool == "fresh" else pool
        tasks = sample_new_tasks(suite.train_envs, count, derived_seed(cfg.seed, 1), exclude=excluded)
    if cfg.split == "train":
        banned = {(t.env_name, t.rand_vec) for t in excluded}
        clash = [t for t in tasks if (t.env_name, t.rand_vec) in banned]
        if clash:
            raise UsageError(f"task pool {cfg.task_pool!r} of {cfg.suite} contains {len(clash)} test or validation "
                             f"task(s), e.g. {clash[0].env_name}; valid pools never do")
    # Every task is played floor or ceil(trials / len(tasks)) times, in a seeded order.
    order = _interleave_envs(np.random.default_rng(derived_seed(cfg.seed, 2)).permutation(len(tasks)), tasks)
    trial_tasks = [int(order[i % len(tasks)]) for i in range(cfg.trials)]
    return tasks, trial_tasks


def _interleave_envs(order: np.ndarray, tasks: list) -> np.ndarray:
    """``order`` stably sorted by each task's rank among its environment's tasks in it: one task of every
    environment, then a second of every environment, ... so any number of trials is spread over the
    environments floor/ceil when they hold equally many tasks. One environment: ``order`` unchanged."""
    seen: dict[str, int] = {}
    rank = np.empty(len(order), np.int64)
    for j, i in enumerate(order):
        name = tasks[i].env_name
        rank[j], seen[name] = seen.get(name, 0), seen.get(name, 0) + 1
    return order[np.argsort(rank, kind="stable")]


def environment_counts(cfg: GenerateConfig, tasks: list, trial_tasks: list[int]) -> dict[str, dict[str, int]]:
    """Per environment: its distinct tasks in the pool, and the trials and steps played on it."""
    steps_per_trial = cfg.episodes_per_trial * cfg.episode_length  # simulator steps
    counts: dict[str, dict[str, int]] = {}
    for t in tasks:
        counts.setdefault(t.env_name, {"tasks": 0, "trials": 0, "steps": 0})["tasks"] += 1
    for i in trial_tasks:
        counts[tasks[i].env_name]["trials"] += 1
        counts[tasks[i].env_name]["steps"] += steps_per_trial
    return dict(sorted(counts.items()))
