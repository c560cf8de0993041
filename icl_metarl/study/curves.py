"""Learning curves against budget (issue 22), ``icl-metarl curves``: success after adaptation of every
snapshot of each training run, on the validation split, against the env steps and the CPU minutes it cost
to get there, and per run the snapshot to play on test.

What a snapshot is: a gradient meta-RL run keeps one per checkpoint (``snapshots/iteration-N``); an
in-context run with relabelling rounds has one per phase (``round-r/train``), whose cumulative budget is
its own data (every histories directory so far, counted once) plus the optimizer steps and CPU time of
every phase up to it; any other checkpoint is one point. Every snapshot is played by the shared
evaluator on the same tasks and seeds. Resumable: points already in ``DIR/curves.json`` with the same
settings are kept. Prints one row per point and writes ``curves.json``, ``curves.md`` and
``budget_curves.png``.

Choosing on validation: for each run the point with the best success in the last adaptation episode is
the one to play on test (a tie goes to the earlier, cheaper point). The run has *stopped improving* when
``patience`` later points all failed to beat it; otherwise the report says it was still improving.
``every`` plays only the snapshots whose iteration is a multiple of it (and the run's final one);
``reuse`` takes the points of earlier output directories (same settings) instead of playing them again.

Not for: training (``until_stopped.py`` grows a run in chunks and calls ``play_curves`` between them).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from icl_metarl.harness.budget import read_budget, run_budget
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents
from icl_metarl.harness.files import (
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from icl_metarl.harness.report import adaptation_summary, compact


def _final(snapshot: Path) -> bool:
    """Whether a meta-RL snapshot is its run's last iteration (not just the newest of a run still going)."""
    config = read_json(snapshot / "config.json")
    return config.get("iteration") == config.get("config", {}).get("iterations")


def snapshots(run: Path, every: int = 1) -> list[tuple[str, Path, dict]]:
    """(name, loadable checkpoint, cumulative budget) of every point of ``run``, in training order; of a
    meta-RL run's snapshots only iterations that are multiples of ``every``, and the run's final one."""
    snaps = sorted((run / "snapshots").glob("iteration-*"))
    if snaps:
        snaps = [p for p in snaps if int(p.name.split("-")[1]) % every == 0 or (p == snaps[-1] and _final(p))]
        return [(p.name, p, read_budget(p)) for p in snaps if read_budget(p)]
    rounds = sorted(run.glob("round-*/train"), key=lambda p: int(p.parent.name.split("-")[1]))
    if rounds:
        out = []
        for phase in rounds:
            total = run_budget(phase)
            if total is None or not (phase / "config.json").is_file():
                break  # a phase not finished (or trained before budgets): the curve stops before it
            out.append((phase.parent.name, phase, total))
        return out
    budget = read_budget(run)
    if budget is None:
        raise UsageError(f"{run} has no budget.json (and no snapshots/ or round-*/train with one): train it with "
                         f"this version to record its budget")
    return [("final", run, budget)]


def choose(points: list[dict], patience: int = 2) -> dict[str, dict]:
    """Per run: the point to play on test (best validation success in the last adaptation episode, a tie to
    the earlier point), how many later points failed to beat it, and whether that makes it stopped."""
    chosen = {}
    for run in dict.fromkeys(p["run"] for p in points):
        pts = sorted((p for p in points if p["run"] == run), key=lambda p: p["budget"]["env_steps"] or 0)
        best = max(range(len(pts)), key=lambda i: (pts[i]["success_last"][0], -i))
        after = len(pts) - 1 - best
        chosen[run] = {"point": pts[best]["point"], "success_last": pts[best]["success_last"],
                       "points_after": after, "stopped_improving": after >= patience}
    return chosen


def summary(chosen: dict[str, dict], patience: int) -> list[str]:
    """One line per run: which point to play on test and whether the run had stopped improving."""
    return [f"- {run}: play {c['point']} on test ({c['success_last'][0]:.2f} [{c['success_last'][1]:.2f}, "
            f"{c['success_last'][2]:.2f}]); "
            + (f"stopped improving ({c['points_after']} later points below it)" if c["stopped_improving"]
               else f"still improving ({c['points_after']} later point(s), patience {patience})")
            for run, c in chosen.items()]


def _family(agent: str) -> str:
    """The learner of a point's agent label: a snapshot's label ends with its iteration, a seed's with #n."""
    return re.sub(r"(-iteration-\d+)?( #\d+)?$", "", agent)


def run_families(points: list[dict]) -> dict[str, str]:
    """Each run of the points (in order of first appearance) and its learner."""
    return {run: _family(next(p["agent"] for p in points if p["run"] == run))
            for run in dict.fromkeys(p["run"] for p in points)}


def grouped_runs(family: dict[str, str]) -> list[str]:
    """The runs of ``run_families``, each learner's together (learners in order of first appearance, runs in
    order within one): a run curved later, e.g. a seed added with --reuse, sits beside its learner's others."""
    learners = list(dict.fromkeys(family.values()))
    return sorted(family, key=lambda run: learners.index(family[run]))


def plot(points: list[dict], path: Path) -> None:
    """Success against env steps and CPU minutes, one line per run: one colour per learner, one line style per
    run of that learner (its training seeds), so many runs stay readable."""
    family = run_families(points)
    runs = grouped_runs(family)
    colours = {f: f"C{i % 10}" for i, f in enumerate(dict.fromkeys(family.values()))}
    styles = {run: ("-", "--", ":", "-.")[[r for r in runs if family[r] == family[run]].index(run) % 4] for run in runs}
    fig = Figure(figsize=(13 if len(runs) > 6 else 11, 4.5))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "env_steps", "env steps (training)"), (axes[1], "cpu_minutes", "CPU minutes")):
        for run in runs:
            pts = sorted((p for p in points if p["run"] == run), key=lambda p: p["budget"][key] or 0)
            x = [p["budget"][key] for p in pts]
            m, lo, hi = (np.array([p["success_last"][i] for p in pts]) for i in range(3))
            ax.plot(x, m, marker="o", markersize=3, color=colours[family[run]], linestyle=styles[run],
                    label=f"{family[run]} ({run})")
            ax.fill_between(x, lo, hi, color=colours[family[run]], alpha=0.15 if len(runs) <= 6 else 0.05)
        ax.set(xscale="log", xlabel=label, ylabel="success, last adaptation episode", ylim=(-0.02, 1.02))
        # ticks at 1, 2, 5 x 10^k written as 200k or 20 (the default log labels of minor ticks overlap)
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: compact(int(v)) if v >= 1000 else f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    if len(runs) <= 6:
        axes[0].legend(fontsize=7)
    else:  # many runs: the legend beside the plots, not over the lines
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.suptitle(f"success after adaptation against budget ({points[0]['split']} split; bands: 95% intervals)")
    fig.tight_layout(rect=(0, 0, 0.78, 1) if len(runs) > 6 else None)
    atomic_write_figure(fig, path, dpi=100)


def table(points: list[dict]) -> str:
    rows = ["| run | point | agent | env steps | expert labels | optimizer steps | CPU min | success, episode 1 "
            "| success, last adaptation episode |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        b = p["budget"]
        rows.append(f"| {p['run']} | {p['point']} | {p['agent']} | {compact(b['env_steps'])} | "
                    f"{compact(b['expert_labels'])} | {compact(b['optimizer_steps'])} | {b['cpu_minutes']:.1f} | "
                    f"{p['success_first'][0]:.2f} | {p['success_last'][0]:.2f} [{p['success_last'][1]:.2f}, "
                    f"{p['success_last'][2]:.2f}] |")
    return "\n".join(rows)


def play_curves(runs: list[str], config: EvalConfig, out, deterministic: bool = False, every: int = 1,
                patience: int = 2, reuse: tuple[str, ...] = ()) -> dict[str, dict]:
    """``icl-metarl curves``: play every snapshot of ``runs`` not yet in ``out/curves.json`` (or a ``reuse``
    directory's) on ``config``'s split; write curves.json, curves.md and the plot; return ``choose``'s verdict
    per run (empty if no run has a point)."""
    if every < 1 or patience < 1:
        raise UsageError(f"--every {every} / --patience {patience}: both must be at least 1")
    out = Path(out)
    settings = {**dataclasses.asdict(config), "seeds": list(config.seeds), "deterministic": deterministic}
    old = read_json(out / "curves.json") if (out / "curves.json").is_file() else {}
    points = old.get("points", []) if old.get("settings") == settings else []
    done = {(q["run"], q["point"]) for q in points}
    named = {str(Path(r)) for r in runs}
    for other in map(Path, reuse):
        found = read_json(other / "curves.json") if (other / "curves.json").is_file() else None
        if found is None or found.get("settings") != settings:
            raise UsageError(f"--reuse {other}: " + ("no curves.json there" if found is None else
                             "played with other settings than these (suite, split, episodes, tasks, seeds)"))
        for q in found["points"]:
            if q["run"] in named and (q["run"], q["point"]) not in done:
                points.append(q)
                done.add((q["run"], q["point"]))
    options = {"deterministic": True} if deterministic else {}
    for run in map(Path, runs):
        for name, where, budget in snapshots(run, every):
            if (str(run), name) in done:
                continue
            agents = load_agents([str(where)], options=options)
            results = evaluate(agents, config, out / "evals" / run.name / name)
            row = next(r for r in adaptation_summary(results) if r["adaptive"])
            points.append({"run": str(run), "point": name, "agent": row["agent"], "split": config.split,
                           "budget": budget, "success_first": row["first"], "success_last": row["last"]})
            atomic_write_json(out / "curves.json", {"settings": settings, "points": points})
            b = budget
            print(f"{run} {name}: env steps {compact(b['env_steps'])}, expert labels {compact(b['expert_labels'])}, "
                  f"CPU {b['cpu_minutes']:.1f} min -> success {row['last'][0]:.2f} "
                  f"[{row['last'][1]:.2f}, {row['last'][2]:.2f}]", flush=True)
    if not points:
        return {}
    chosen = choose(points, patience)
    atomic_write_json(out / "curves.json", {"settings": settings, "points": points, "chosen": chosen})
    plot(points, out / "budget_curves.png")
    lines = summary(chosen, patience)
    atomic_write_text(out / "curves.md", f"{table(points)}\n\nChosen on the {config.split} split:\n"
                      + "\n".join(lines) + "\n")
    print(table(points))
    print("\n".join(lines))
    return chosen
