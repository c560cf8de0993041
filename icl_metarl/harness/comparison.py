"""Two learners, each with replicate runs (training seeds), compared in one episode across evaluations:
each learner's mean and interquartile mean over its runs, and A minus B paired run by run, task by task
and seed by seed, with tasks won/lost and the exact sign test; every interval from ``statistics``.

``icl-metarl compare DIR ... --a LABEL ... --b LABEL ... --episode N`` (or ``--episode evaluation``: each trial's
mean over its evaluation episodes, the figure Meta-World reports; ``--per-env``: the same per environment). The evaluations must share one
protocol (suite, split, episodes, episode length, tasks and seeds), so that records pair task by task;
anything else is refused in one line. A label found in several of them is named ``DIR:LABEL``.
Not for: one evaluation's report (``report.py``); playing agents (``evaluation.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import load_results
from icl_metarl.harness.report import best_return_success, episode_array
from icl_metarl.harness.statistics import Interval, difference_interval, iqm_interval, mean_interval, won_lost

#: what makes two evaluations' records pair task by task (batch size, vector mode, progress do not)
PROTOCOL = ("suite", "split", "adaptation_episodes", "evaluation_episodes", "episode_length", "seeds", "num_tasks",
            "tasks_per_env", "task_seed")

Loaded = list[tuple[str, dict]]  # (directory as given, results.json)


def load_evaluations(paths: Sequence[str]) -> Loaded:
    """(name, results) of each results directory (or results.json); refuses evaluations of another
    protocol, other tasks or other seeds than the first's."""
    names = dict.fromkeys(str(Path(p)) for p in paths)  # one evaluation named twice ("r", "r/") is loaded once
    loaded = [(name, load_results(name)) for name in names]
    (first, r0), rest = loaded[0], loaded[1:]
    for name, r in rest:
        for key in PROTOCOL:
            if r["settings"].get(key) != r0["settings"].get(key):
                raise UsageError(f"{name} was played with {key}={r['settings'].get(key)!r}, {first} with "
                                 f"{r0['settings'].get(key)!r}; only evaluations of the same protocol pair task by task")
        if r["tasks"] != r0["tasks"] or r["seeds"] != r0["seeds"]:
            raise UsageError(f"{name} and {first} hold different tasks or seeds; only evaluations of the same "
                             "tasks and seeds pair task by task")
    return loaded


def find_agent(loaded: Loaded, label: str) -> tuple[str, str]:
    """(evaluation name, agent label) of ``label`` or ``DIR:LABEL``; refuses one absent or in several."""
    where, sep, bare = label.rpartition(":")
    if sep and any(name == str(Path(where)) for name, _ in loaded):
        loaded, label = [(n, r) for n, r in loaded if n == str(Path(where))], bare
    hits = [n for n, r in loaded if label in r["agents"]]
    if not hits:
        valid = ", ".join(a for _, r in loaded for a in r["agents"])
        raise UsageError(f"no agent {label!r} in the results; valid: {valid}")
    if len(hits) > 1:
        raise UsageError(f"agent {label!r} is in {' and '.join(hits)}; name it as RESULTS_DIR:LABEL")
    return hits[0], label


def non_adaptive_variant(loaded: Loaded, run: tuple[str, str]) -> tuple[str, str]:
    """The run of ``run``'s non-adaptive variant: the same checkpoint in the same evaluation."""
    name, label = run
    agents = dict(loaded)[name]["agents"]
    variants = [a for a, info in agents.items() if info["spec"] == agents[label]["spec"] and not info["adaptive"]]
    if not agents[label]["adaptive"] or not variants:
        raise UsageError(f"{label!r} in {name} is not an adaptive agent evaluated with --non-adaptive; "
                         "give B's runs with --b")
    return name, variants[0]


EVALUATION = "evaluation"  # --episode evaluation: the mean over a trial's evaluation episodes
#: --episode replay-best: the success of a trial's highest-return adaptation episode, which replaying it would
#: score in the evaluation episodes (``report.best_return_success``)
REPLAY_BEST = "replay-best"


def parse_episode(value: int | str, settings: dict) -> int | str:
    """``value`` as an episode of trials played with ``settings``: a 1-based index, ``"evaluation"`` or
    ``"replay-best"``; anything else is refused in one line naming what is allowed."""
    n = settings["adaptation_episodes"] + settings["evaluation_episodes"]
    both = settings["evaluation_episodes"] > 0 and settings["adaptation_episodes"] > 0
    if str(value) == EVALUATION and settings["evaluation_episodes"] > 0:
        return EVALUATION
    if str(value) == REPLAY_BEST and both:
        return REPLAY_BEST
    try:
        episode = int(value)
    except ValueError:
        episode = 0
    if not 1 <= episode <= n:
        allowed = f"1..{n}" + (f" or {EVALUATION!r}" if settings["evaluation_episodes"] else "") \
            + (f" or {REPLAY_BEST!r}" if both else "")
        raise UsageError(f"--episode {value}: allowed {allowed} (an episode of the trial, the mean over its "
                         "evaluation episodes, or the success of its highest-return adaptation episode)")
    return episode


def success(loaded: Loaded, runs: Sequence[tuple[str, str]], episode: int | str) -> np.ndarray:
    """(runs, tasks, seeds): success of each run in ``episode`` (1-based), with ``"evaluation"`` its mean
    over the evaluation episodes, with ``"replay-best"`` that of its highest-return adaptation episode; NaN
    where no record exists."""
    by_name = dict(loaded)
    out = []
    for name, label in runs:
        r = by_name[name]
        K, E = r["settings"]["adaptation_episodes"], r["settings"]["evaluation_episodes"]
        curve = episode_array(r["records"], label, "success", len(r["tasks"]), r["seeds"], K + E)
        if episode == REPLAY_BEST:
            returns = episode_array(r["records"], label, "return", len(r["tasks"]), r["seeds"], K + E)
            out.append(best_return_success(curve, returns, K))
        else:
            out.append(np.nanmean(curve[K:], axis=0) if episode == EVALUATION else curve[episode - 1])
    return np.stack(out)


def _fmt(c: Interval, sign: str = "") -> str:
    return f"{c.estimate:{sign}.2f} [{c.low:{sign}.2f}, {c.high:{sign}.2f}]"


def compare_lines(loaded: Loaded, a: Sequence[tuple[str, str]], b: Sequence[tuple[str, str]], episode: int | str,
                  num_resamples: int = 2000) -> list[str]:
    """The comparison as markdown: per learner its runs, mean and IQM; then A minus B, paired."""
    r0 = loaded[0][1]
    s = r0["settings"]
    xa, xb = success(loaded, a, episode), success(loaded, b, episode)  # (runs, tasks, seeds)
    if episode == EVALUATION:
        K = s["adaptation_episodes"]
        which = f"the evaluation episodes {K + 1}-{K + s['evaluation_episodes']} (each trial's mean)"
    elif episode == REPLAY_BEST:
        which = (f"each trial's highest-return adaptation episode (1-{s['adaptation_episodes']}), what replaying "
                 "its actions in the evaluation episodes would score (replay is exact: scripts/replay_check.py)")
    else:
        which = f"episode {episode}" + (" (the last adaptation episode)" if episode == s["adaptation_episodes"] else "")
    lines = [f"Success in {which}, {len(r0['tasks'])} {s['split']} tasks of {s['suite']} x evaluation "
             f"seeds {r0['seeds']}; A and B {len(a)} runs each, run i of A paired with run i of B.", "",
             "| learner | runs | each run | mean [95% CI] | IQM [95% CI] |", "|---|---|---|---|---|"]
    for side, runs, x in (("A", a, xa), ("B", b, xb)):
        each = ", ".join(f"{m:.2f}" for m in np.nanmean(x, axis=(1, 2)))
        names = ", ".join(label if len(loaded) == 1 else f"{name}:{label}" for name, label in runs)
        lines.append(f"| {side} | {names} | {each} | {_fmt(mean_interval(x, num_resamples))} | "
                     f"{_fmt(iqm_interval(x, num_resamples))} |")
    won, lost, tasks, p = won_lost(xa - xb)
    lines += ["", f"A - B {_fmt(difference_interval(xa, xb, num_resamples), '+')}; tasks won {won}, lost {lost} of "
              f"{tasks} (runs and seeds averaged within a task); sign test p {p:.3g}", "",
              f"95% percentile bootstrap intervals, {num_resamples} resamples: runs, then tasks within each drawn run, "
              "then evaluation seeds within each drawn task. IQM: mean of the middle half of the (run, task) "
              "scores (Agarwal et al. 2021). Sign test: exact, two-sided, over the tasks that differ."]
    return lines


def per_env_lines(loaded: Loaded, a: Sequence[tuple[str, str]], b: Sequence[tuple[str, str]], episode: int | str,
                  num_resamples: int = 2000) -> list[str]:
    """One row per environment of the tasks: A, B and A minus B over that environment's tasks, pooled as the
    whole is (runs, then its tasks, then seeds), with tasks won and lost."""
    r0 = loaded[0][1]
    envs = [t.get("env_name", "?") for t in r0["tasks"]]
    xa, xb = success(loaded, a, episode), success(loaded, b, episode)  # (runs, tasks, seeds)
    lines = ["| environment | tasks | A mean [95% CI] | B mean [95% CI] | A - B [95% CI] | won / lost |",
             "|---|---|---|---|---|---|"]
    for env in dict.fromkeys(envs):
        mask = np.array([e == env for e in envs])
        won, lost, _, _ = won_lost(xa[:, mask] - xb[:, mask])
        lines.append(f"| {env} | {int(mask.sum())} | {_fmt(mean_interval(xa[:, mask], num_resamples))} | "
                     f"{_fmt(mean_interval(xb[:, mask], num_resamples))} | "
                     f"{_fmt(difference_interval(xa[:, mask], xb[:, mask], num_resamples), '+')} | {won} / {lost} |")
    return lines


def compare_command(paths: Sequence[str], a: Sequence[str], b: Sequence[str] | None, against_non_adaptive: bool,
                    episode: int | str, num_resamples: int, per_env: bool = False) -> None:
    """``icl-metarl compare``: the comparison printed as markdown."""
    if (b is None) == (not against_non_adaptive):
        raise UsageError("give B's runs with --b LABEL ... or --against-non-adaptive, not both or neither")
    if num_resamples < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {num_resamples}")
    loaded = load_evaluations(paths)
    episode = parse_episode(episode, loaded[0][1]["settings"])
    runs_a = [find_agent(loaded, label) for label in a]
    runs_b = ([non_adaptive_variant(loaded, run) for run in runs_a] if against_non_adaptive
              else [find_agent(loaded, label) for label in b])
    for side, runs in (("--a", runs_a), ("--b", runs_b)):
        twice = sorted({f"{where}:{label}" for where, label in runs if runs.count((where, label)) > 1})
        if twice:
            raise UsageError(f"{side} names {', '.join(twice)} more than once; each run counts once")
    if len(runs_a) != len(runs_b):
        raise UsageError(f"--a has {len(runs_a)} runs and --b {len(runs_b)}; the difference pairs run i of A with "
                         "run i of B, so give as many of each")
    lines = compare_lines(loaded, runs_a, runs_b, episode, num_resamples)
    if per_env:
        lines += ["", "Per environment (its tasks only, pooled the same way):", "",
                  *per_env_lines(loaded, runs_a, runs_b, episode, num_resamples)]
    print("\n".join(lines))
