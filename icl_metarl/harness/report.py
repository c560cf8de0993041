"""Tables and plots from an evaluation's results.json: adaptation curves with 95% bootstrap intervals,
the success definitions papers use (each labelled), per-environment tables, steps to first success, and
each agent's decision interval where it matters.

Not for: playing agents (``evaluation.py``); every figure here is recomputed from the raw records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from icl_metarl.harness.files import atomic_write_figure, atomic_write_text
from icl_metarl.harness.statistics import Interval, difference_interval, iqm_interval, mean_interval, won_lost


# ----------------------------------------------------------------------------------------- arrays
def episode_array(records: Sequence[dict], agent: str, key: str, num_tasks: int, seeds: Sequence[int],
                  num_episodes: int, episode_length: int | None = None) -> np.ndarray:
    """One agent's records as an array (episodes, tasks, seeds); NaN where no record exists.

    ``key="steps_to_success"`` counts an episode without success as ``episode_length`` (censored), so
    the mean stays defined and an agent that never succeeds sits at the top of the plot.
    """
    out = np.full((num_episodes, num_tasks, len(seeds)), np.nan)
    col = {s: i for i, s in enumerate(seeds)}
    for r in records:
        if r["agent"] != agent:
            continue
        v = r[key]
        if key == "steps_to_success" and v is None:
            v = episode_length
        out[r["episode"], r["task"], col[r["seed"]]] = float(v)
    return out


def success_within(success: np.ndarray, k: int) -> np.ndarray:
    """(tasks, seeds): 1 if the trial succeeded in any of its first ``k`` episodes (success: (episodes, tasks, seeds))."""
    first_k = success[:k]
    any_ = np.nanmax(np.where(np.isnan(first_k), -np.inf, first_k), axis=0)
    return np.where(np.isinf(any_), np.nan, any_)


def best_return_success(success: np.ndarray, returns: np.ndarray, adaptation_episodes: int) -> np.ndarray:
    """(tasks, seeds): the success of each trial's highest-return adaptation episode (the first of a tie), NaN
    where a trial has no adaptation record. From success and returns (episodes, tasks, seeds).

    An episode of a trial starts from the same state as the others and the simulator is deterministic, so an
    agent that replayed that episode's actions in its evaluation episodes would score exactly this there
    (measured: 90 of 90 replays of a successful episode succeed, none of a failed one:
    ``scripts/replay_check.py``). It reads returns only, which every meta-RL agent is given.
    """
    r = returns[:adaptation_episodes]
    missing = np.all(np.isnan(r), axis=0)
    best = np.argmax(np.where(np.isnan(r), -np.inf, r), axis=0)  # (tasks, seeds)
    chosen = np.take_along_axis(success[:adaptation_episodes], best[None], axis=0)[0]
    return np.where(missing, np.nan, chosen)


def keep_figures(success: np.ndarray, adaptation_episodes: int,
                 returns: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Does an agent keep a success it found? From one agent's success (episodes, tasks, seeds), per trial
    (tasks, seeds), NaN where a figure is undefined for the trial:

    - ``found``: 1 if an adaptation episode (1..K) succeeded, else 0;
    - ``kept``: the evaluation episodes' success of the trials that found one;
    - ``not found``: the evaluation episodes' success of the trials that did not;
    - ``next after a success``: of the episodes that succeeded (but the last), the share whose next episode
      succeeded too;
    - ``replay best``, with ``returns``: ``best_return_success``, what replaying the highest-return adaptation
      episode would score in the evaluation episodes.

    A task's start is the same in every episode of a trial (Meta-World resets a task to one state), so an
    agent that succeeded once can succeed again by doing the same; a Bayes-optimal agent keeps its success.
    """
    K = adaptation_episodes
    found = success_within(success, K)
    evaluation = np.nanmean(success[K:], axis=0) if len(success) > K else np.full(found.shape, np.nan)
    before, after = success[:-1], success[1:]
    pairs = ~np.isnan(before) & ~np.isnan(after) & (before == 1)
    hits, repeats = pairs.sum(axis=0), (pairs & (after == 1)).sum(axis=0)
    figures = {
        "found": found,
        "kept": np.where(found == 1, evaluation, np.nan),
        "not found": np.where(found == 0, evaluation, np.nan),
        "next after a success": np.where(hits > 0, repeats / np.maximum(hits, 1), np.nan),
    }
    if returns is not None:
        figures["replay best"] = best_return_success(success, returns, K)
    return figures


# ---------------------------------------------------------------------------------------- report
def _pool(description: dict) -> str:
    """The task pool an agent says trained it (``describe()["task_pool"]``)."""
    return str(description.get("task_pool", "not stated by the agent"))


def compact(n: float) -> str:
    """A count in a few characters: 950 -> '950', 40000 -> '40k', 1234567 -> '1.2M'."""
    units, i = ("", "k", "M", "G"), 0
    while abs(n) >= 999.5 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return (f"{n:.1f}".rstrip("0").rstrip(".") if i and abs(n) < 9.95 else f"{n:.0f}") + units[i]


def decision_intervals(results: dict) -> dict[str, int]:
    """The decision interval k each agent acted at (it held each action for k simulator steps), by label;
    {} when every agent acted at every step, where the report does not mention it. A results.json
    written before agents recorded theirs (no ``action_repeat``) acted at every step."""
    k = {a: int(info.get("action_repeat", 1)) for a, info in results["agents"].items()}
    return k if any(v != 1 for v in k.values()) else {}


def acts_every(k: int) -> str:
    return "acts every step" if k == 1 else f"acts every {k} steps"


def exploration_lines(results: dict) -> list[str]:
    """One sentence naming how each exploring agent explored (its ``describe()``: ``explore_episodes``,
    ``explore_scale``, ``explore_kind``); [] when none did."""
    said = []
    for a, info in results["agents"].items():
        d = info.get("description", {})
        n, scale = int(d.get("explore_episodes") or 0), float(d.get("explore_scale") or 0.0)
        if n <= 0 or scale <= 0:
            continue
        episodes = "episode 1" if n == 1 else f"episodes 1-{n}"
        how = (f"a fresh perturbation of every decision (N(0, {scale:g}^2), added before the squash)"
               if d.get("explore_kind") == "step" else f"one constant action offset per episode (N(0, {scale:g}^2))")
        said.append(f"{a} explores in {episodes} of each trial: {how}")
    return ["Exploration: " + "; ".join(said) + ".", ""] if said else []


def _budget_cells(description: dict) -> str:
    """The Agents table's budget columns from ``describe()["budget"]`` (a checkpoint's budget.json);
    blank for an agent that did not train (a baseline) or a checkpoint that predates budgets."""
    b = description.get("budget")
    if not b:
        return "  |  |  |  |"
    m = b["cpu_minutes"]
    cpu = f"{m:.2g}" if m < 10 else compact(m)
    return (f" {compact(b['env_steps'])} | {compact(b['expert_labels'])} | {compact(b['optimizer_steps'])} | "
            f"{'>=' if b.get('data_cpu_minutes', 0) is None else ''}{cpu} |")


def _fmt(ci: tuple[float, float, float], digits: int = 2, sign: bool = False) -> str:
    """'mean [low, high]'; ``sign`` writes a + before positive numbers (for differences)."""
    m, lo, hi = ci
    if np.isnan(m):
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


class _View:
    """The arrays one report needs, built once from results.json."""

    def __init__(self, results: dict, num_resamples: int):
        s = results["settings"]
        self.results = results
        self.K, self.E, self.L = s["adaptation_episodes"], s["evaluation_episodes"], s["episode_length"]
        self.seeds = list(results["seeds"])
        self.tasks = results["tasks"]
        self.agents = list(results["agents"])
        self.R = num_resamples
        n = self.K + self.E
        self.arr = {
            key: {a: episode_array(results["records"], a, key, len(self.tasks), self.seeds, n, self.L)
                  for a in self.agents}
            for key in ("success", "return", "steps_to_success")
        }

    def ci(self, values: np.ndarray) -> Interval:
        return mean_interval(values, self.R)

    def curve(self, key: str, agent: str) -> np.ndarray:
        """(episodes, 3): mean, low, high at every episode index."""
        return np.array([self.ci(ep) for ep in self.arr[key][agent]])


def success_definitions(view: _View, agent: str) -> dict[str, tuple[float, float, float]]:
    """The success figures papers report, each under the name the report prints."""
    succ = view.arr["success"][agent]  # (episodes, tasks, seeds)
    K, E = view.K, view.E
    out = {"first episode": view.ci(succ[0])}
    if K > 0:
        out[f"last adaptation episode ({K})"] = view.ci(succ[K - 1])
    if E > 0:
        span = f"episode {K + 1}" if E == 1 else f"episodes {K + 1}-{K + E}"
        out[f"evaluation {span}, mean (Meta-World's figure)"] = view.ci(np.nanmean(succ[K:], axis=0))
    out[f"last episode ({K + E})"] = view.ci(succ[K + E - 1])
    best = np.nanmax(np.nanmean(succ, axis=(1, 2))) if not np.all(np.isnan(succ)) else np.nan
    out["best episode index (max over the curve; optimistic)"] = (float(best), float("nan"), float("nan"))
    for k in sorted({1, 3, K + E} - {0}):
        if k <= K + E:
            out[f"within {k} attempts"] = view.ci(success_within(succ, k))
    return out


def adaptation_summary(results: dict, num_resamples: int = 2000) -> list[dict]:
    """Per agent: success in the first and last adaptation episode (and the last's interquartile mean over
    tasks), their paired difference, and for a checkpoint its last adaptation episode minus its
    non-adaptive variant's; with 95% bootstrap CIs."""
    s = results["settings"]
    K, E = s["adaptation_episodes"], s["evaluation_episodes"]
    last = K - 1 if K >= 2 else K + E - 1
    succ = {a: episode_array(results["records"], a, "success", len(results["tasks"]), results["seeds"], K + E)
            for a in results["agents"]}  # (episodes, tasks, seeds)
    wiped = {info["spec"]: a for a, info in results["agents"].items() if not info["adaptive"]}
    rows = []
    for a, info in results["agents"].items():
        x = succ[a]
        row = {"agent": a, "spec": info["spec"], "adaptive": info["adaptive"], "last_index": last + 1,
               "first": mean_interval(x[0], num_resamples), "last": mean_interval(x[last], num_resamples),
               "last_iqm": iqm_interval(x[last], num_resamples),
               "gain": difference_interval(x[last], x[0], num_resamples)}  # paired: same task and seed
        if info["adaptive"] and info["spec"] in wiped:
            y = succ[wiped[info["spec"]]][last]
            row["non_adaptive_last"] = mean_interval(y, num_resamples)
            row["vs_non_adaptive"] = difference_interval(x[last], y, num_resamples)
            row["won_lost"] = won_lost(x[last] - y)
        rows.append(row)
    return rows


def _verdict(c) -> str:
    m, lo, hi = c
    if np.isnan(m):
        return "n/a"
    if lo > 0:
        return "yes: the whole interval is above 0"
    if hi < 0:
        return "no: worse (the whole interval is below 0)"
    return "not shown: the interval contains 0"


def adaptation_lines(results: dict, num_resamples: int = 2000,
                     heading: str | None = "## Does each agent adapt?") -> list[str]:
    """The 'Does each agent adapt?' section: first vs last adaptation episode and adaptive vs non-adaptive
    variant, both paired by task and seed, each with its verdict; ``heading=None``: without its heading,
    for a caller that puts the table under its own."""
    s = results["settings"]
    rows = adaptation_summary(results, num_resamples)
    if not rows:
        return []
    last = rows[0]["last_index"]
    lines = ([heading, ""] if heading else []) + [
        f"{len(results['tasks'])} {s.get('split', 'test')} tasks x seeds {results['seeds']}; per trial "
        f"{s['adaptation_episodes']} adaptation then {s['evaluation_episodes']} evaluation episode(s). "
        f"Success of episode 1 and of episode {last} (the last adaptation episode); 'gain' is their difference "
        "paired by task and seed; the last column compares a checkpoint with its own non-adaptive variant "
        "(in-context: context wiped every episode; gradient: no adaptation step) in the same episode, paired. "
        "Brackets: 95% bootstrap intervals over tasks (and seeds within tasks). An agent adapts here if its "
        "gain's interval lies above 0, and beats its non-adaptive variant if that difference's interval does; "
        "'won/lost' counts the tasks on which the adaptive variant did better or worse (seeds averaged), with "
        "the two-sided exact sign test's p over the tasks that differ: with few such tasks the bootstrap interval "
        f"can exclude 0 while p is still above 0.05. 'IQM': the interquartile mean of the tasks' success in episode "
        f"{last} (each task's seeds averaged, then the mean of the middle half of tasks: robust to a few outlying "
        "tasks; Agarwal et al. 2021), with its bootstrap interval.", "",
        f"| agent | success, episode 1 | success, episode {last} | IQM, episode {last} | gain | adapts? | episode "
        f"{last} minus non-adaptive variant | beats it? |", "|---|---|---|---|---|---|---|---|",
    ]
    interval = decision_intervals(results)
    for r in rows:
        vs = r.get("vs_non_adaptive")
        agent = f"{r['agent']} ({acts_every(interval[r['agent']])})" if interval else r["agent"]
        lines.append(f"| {agent} | {_fmt(r['first'])} | {_fmt(r['last'])} | {_fmt(r['last_iqm'])} | "
                     f"{_fmt(r['gain'], sign=True)} | {_verdict(r['gain'])} | "
                     f"{_fmt(vs, sign=True) + ' (tasks won {}, lost {} of {}; sign test p {:.3f})'.format(*r['won_lost']) if vs else ''} | "
                     f"{_verdict(vs) if vs else ''} |")
    return lines + [""]


def _answer(c, yes: str, no: str, unclear: str) -> str:
    m, lo, hi = c
    return "n/a" if np.isnan(m) else yes if lo > 0 else no if hi < 0 else unclear


def claim_lines(results: dict, adapters: Sequence[tuple[str, str, str]], versus: tuple[str, str] | None = None,
                num_resamples: int = 2000) -> list[str]:
    """One sentence per claim, for the top of a report: does each agent adapt (``adapters``: (label, what
    adapts it, what its non-adaptive variant lacks)), and which of ``versus`` (two labels) is better in
    the last adaptation episode; every figure with its 95% interval, differences paired by task and seed."""
    rows = {r["agent"]: r for r in adaptation_summary(results, num_resamples)}
    if not rows:
        return []
    s = results["settings"]
    last = next(iter(rows.values()))["last_index"]
    trials = f"{len(results['tasks'])} {s.get('split', 'test')} tasks x {len(results['seeds'])} seed(s)"
    lines = []
    for label, source, lacking in adapters:
        r = rows.get(label)
        if r is None or "vs_non_adaptive" not in r:
            continue
        vs = r["vs_non_adaptive"]
        won, lost, _, p = r["won_lost"]
        verdict = _answer(vs, "**yes**", "**no, it does worse**", "**not shown** (the interval contains 0)")
        lines.append(f"- Does `{label}` adapt from {source}? {verdict}: in episode {last} (the last adaptation "
                     f"episode) it succeeds in {_fmt(r['last'])} of the trials, against {_fmt(r['non_adaptive_last'])} {lacking}; "
                     f"difference {_fmt(vs, sign=True)} (tasks won {won}, lost {lost}, sign test p {p:.3f}).")
    if versus and all(a in rows for a in versus):
        a, b = versus
        succ = {x: episode_array(results["records"], x, "success", len(results["tasks"]), results["seeds"],
                                 s["adaptation_episodes"] + s["evaluation_episodes"])[last - 1] for x in versus}
        diff = difference_interval(succ[a], succ[b], num_resamples)
        won, lost, _, p = won_lost(succ[a] - succ[b])
        verdict = _answer(diff, f"`{a}`", f"`{b}`", "neither, beyond the interval")
        lines.append(f"- Which is better in episode {last}? {verdict}: `{a}` {_fmt(rows[a]['last'])} against `{b}` "
                     f"{_fmt(rows[b]['last'])}, difference {_fmt(diff, sign=True)} (tasks won {won}, lost {lost}, "
                     f"sign test p {p:.3f}).")
    if lines:
        lines = [f"What this run showed ({trials}; 95% bootstrap intervals over tasks, differences paired by "
                 "task and seed):", ""] + lines + [""]
    return lines


def keep_lines(view: _View, env_names: Sequence[str]) -> list[str]:
    """'Does it keep what it finds?': ``keep_figures`` per agent with intervals over the trials that define
    each, then found and kept per environment (point figures: few trials find a success in some)."""
    K = view.K
    keep = {a: keep_figures(view.arr["success"][a], K, view.arr["return"][a]) for a in view.agents}
    names = list(next(iter(keep.values())))
    lines = ["## Does it keep what it finds?", "",
             "A task starts from the same state in every episode of its trial, so an agent that succeeded once can "
             "succeed again by doing the same; a Bayes-optimal agent keeps a success. 'Found': the share of trials "
             f"with a success in an adaptation episode (1-{K}). 'Kept': the evaluation episodes' success of those "
             "trials; 'not found': that of the others. 'Next after a success': of the successful episodes (but "
             "the last), the share whose next episode succeeded too, per trial. 'Replay best': the success of each "
             "trial's highest-return adaptation episode, which is what the evaluation episodes would score if the "
             "agent replayed that episode's actions (a trial's episodes start from one state and the simulator is "
             "deterministic: scripts/replay_check.py); compare it with the evaluation episodes' success. Each "
             "interval is over the trials that define its figure.", "",
             "| agent | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in view.agents:
        lines.append(f"| {a} | " + " | ".join(_fmt(view.ci(keep[a][n])) for n in names) + " |")
    lines.append("")
    if len(env_names) > 1:
        lines += ["Per environment, found / kept (point figures; '-': no trial found a success):", "",
                  "| environment | tasks | " + " | ".join(view.agents) + " |", "|---|---|" + "---|" * len(view.agents)]
        for env in env_names:
            idx = [t["index"] for t in view.tasks if t["env_name"] == env]
            cells = []
            for a in view.agents:
                found, kept = keep[a]["found"][idx], keep[a]["kept"][idx]
                cells.append(f"{np.nanmean(found):.2f} / "
                             + (f"{np.nanmean(kept):.2f}" if np.any(~np.isnan(kept)) else "-"))
            lines.append(f"| {env} | {len(idx)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def report_markdown(results: dict, num_resamples: int = 2000, plots: Sequence[str] = ()) -> str:
    """report.md as a string."""
    v = _View(results, num_resamples)
    s = results["settings"]
    lines = [f"# Evaluation: {s['suite']}, {s['split']} split", ""]
    if s["split"] == "validation":
        lines += ["**Validation split:** new tasks of the training environments, for choosing recipes, budgets and "
                  "checkpoints; report the test split, played once per final recipe.", ""]
    elif results.get("diagnostic"):
        lines += ["**Diagnostic only: train split.** The agents may have trained on these tasks; these figures say "
                  "nothing about adaptation to new tasks.", ""]
    lines += [
        f"{len(v.tasks)} tasks (benchmark seed {s['task_seed']}), seeds {v.seeds}; per trial {v.K} adaptation then "
        f"{v.E} evaluation episodes of {v.L} steps. An episode succeeds if `info[\"success\"]` is ever 1 in it. "
        f"Brackets: 95% bootstrap interval over tasks and seeds within tasks ({num_resamples} resamples).",
        "",
        "## Agents", "",
    ]
    interval = decision_intervals(results)
    lines += [
        "| agent | status | trained on (task pool) | type | source |" + (" decision interval |" if interval else "")
        + " env steps | expert labels | optimizer steps | CPU min |", "|---|---|---|---|---|" + "---|" * (4 + bool(interval)),
    ]
    for a, info in results["agents"].items():
        d = info.get("description", {})
        lines.append(f"| {a} | {info['status']} | {_pool(d)} | {d.get('type', '?')} | {info.get('spec', '')} |"
                     + (f" {acts_every(interval[a])} |" if interval else "") + _budget_cells(d))
    lines.append("")
    if interval:
        differ = len(set(interval.values())) > 1
        lines += [("**The agents act at different decision intervals.** " if differ else "")
                  + "An agent that acts every k steps holds each action for k simulator steps; every episode is "
                  f"{v.L} simulator steps whatever k, and success counts at any simulator step.", ""]
    lines += exploration_lines(results)
    if any(info.get("description", {}).get("budget") for info in results["agents"].values()):
        lines += ["Budget of each training run, from its checkpoint's budget.json: environment steps played for "
                  "its training signal, those whose expert action was a training target, optimizer steps, and CPU "
                  "minutes of training plus generating its stored data ('>=': the data's generation time was not "
                  "recorded).", ""]
    lines += adaptation_lines(results, num_resamples)

    lines += ["## Success, by the definitions papers use", "",
              "Each row is one definition; say which one when you put a figure beside a published one. "
              "'Best episode index' is the maximum of the mean curve and has no interval (it is biased upwards).", ""]
    defs = {a: success_definitions(v, a) for a in v.agents}
    names = list(next(iter(defs.values()))) if defs else []
    lines += ["| definition | " + " | ".join(v.agents) + " |", "|---|" + "---|" * len(v.agents)]
    for n in names:
        cells = [_fmt(defs[a][n]) if not np.isnan(defs[a][n][1]) else f"{defs[a][n][0]:.2f}" for a in v.agents]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")

    for key, title, digits, note in (
        ("success", "Adaptation curve: success per episode index", 2, ""),
        ("return", "Adaptation curve: return per episode index", 1, ""),
        ("steps_to_success", "Steps to first success per episode index", 0,
         f"An episode without success counts as {v.L} steps (censored at the episode length)."),
    ):
        lines += [f"## {title}", ""] + ([note, ""] if note else [])
        curves = {a: v.curve(key, a) for a in v.agents}
        lines += ["| episode | phase | " + " | ".join(v.agents) + " |", "|---|---|" + "---|" * len(v.agents)]
        for e in range(v.K + v.E):
            phase = "adaptation" if e < v.K else "evaluation"
            lines.append(f"| {e + 1} | {phase} | " + " | ".join(_fmt(tuple(curves[a][e]), digits) for a in v.agents) + " |")
        lines.append("")

    env_names = sorted({t["env_name"] for t in v.tasks})
    if v.K > 0 and v.E > 0:
        lines += keep_lines(v, env_names)
    if len(env_names) > 1 and v.E > 0:
        lines += ["## Per environment: success in the evaluation episodes (Meta-World's figure)", "",
                  "| environment | tasks | " + " | ".join(v.agents) + " |", "|---|---|" + "---|" * len(v.agents)]
        for env in env_names:
            idx = [t["index"] for t in v.tasks if t["env_name"] == env]
            cells = [_fmt(v.ci(np.nanmean(v.arr["success"][a][v.K:, idx], axis=0))) for a in v.agents]
            lines.append(f"| {env} | {len(idx)} | " + " | ".join(cells) + " |")
        lines += ["", "Steps to first success in the evaluation episodes that succeeded, per environment: median "
                  "(successful episodes); '-': none succeeded. Compare an agent with the oracle where both succeed.", "",
                  "| environment | " + " | ".join(v.agents) + " |", "|---|" + "---|" * len(v.agents)]
        for env in env_names:
            idx = [t["index"] for t in v.tasks if t["env_name"] == env]
            cells = []
            for a in v.agents:
                won = v.arr["success"][a][v.K:, idx] == 1
                steps = v.arr["steps_to_success"][a][v.K:, idx][won]  # a NaN record is no success
                cells.append(f"{np.median(steps):.0f} ({steps.size})" if steps.size else "-")
            lines.append(f"| {env} | " + " | ".join(cells) + " |")
        lines.append("")

    if results["failures"]:
        lines += ["## Failures", "", "Records played before each failure are kept and counted above.", ""]
        for f in results["failures"]:
            lines.append(f"- {f['agent']}, seed {f['seed']}: `{f['error']}`")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    vers = ", ".join(f"{k} {val}" for k, val in results["versions"].items())
    lines += [f"Versions: {vers}.", ""]
    return "\n".join(lines)


def plot_curves(results: dict, out_dir: str | Path, num_resamples: int = 2000) -> list[str]:
    """success.png, return.png, steps_to_success.png: one line per agent, 95% band; file names returned."""
    v = _View(results, num_resamples)
    x = np.arange(1, v.K + v.E + 1)
    names = []
    for key, ylabel in (("success", "success rate"), ("return", "episode return"),
                        ("steps_to_success", f"steps to first success (no success = {v.L})")):
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        for a in v.agents:
            c = v.curve(key, a)
            ax.plot(x, c[:, 0], marker="o", ms=3, label=a)
            ax.fill_between(x, c[:, 1], c[:, 2], alpha=0.2)
        if v.K > 0 and v.E > 0:
            ax.axvline(v.K + 0.5, color="grey", ls="--", lw=1)  # adaptation | evaluation
        ax.set_xlabel("episode index in the trial (dashed: adaptation | evaluation)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{results['settings']['suite']} {results['settings']['split']}: {key.replace('_', ' ')}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{key}.png"
        atomic_write_figure(fig, Path(out_dir) / name)
        names.append(name)
    return names


def write_report(results: dict, out_dir: str | Path, num_resamples: int = 2000) -> Path:
    """Write report.md and the PNG plots into ``out_dir``; return report.md's path."""
    plots = plot_curves(results, out_dir, num_resamples)
    path = Path(out_dir) / "report.md"
    atomic_write_text(path, report_markdown(results, num_resamples, plots))
    return path
