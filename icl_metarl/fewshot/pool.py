"""Several training seeds of one few-shot study, pooled: the figure that holds across seeds, not one run's.

``icl-metarl fewshot pool DIR DIR ... --out OUT`` reads the output directories of ``fewshot evaluate``
(results.json) or of ``fewshot probe`` (metrics.json), one per training seed, and writes pooled.json,
pooled.md and plots. Evaluations must have scored the same test tasks and points (same settings, same
input fingerprints at every family and shot count), else it stops with ``MismatchError``; probes must
share their settings. Every figure is the mean over training seeds with a 95% t-interval that takes the
seed as the unit (n - 1 degrees of freedom), beside the per-seed values, so a reader sees both the spread
between seeds and the centre. A learner that diverged on some tasks in any seed is reported as such, not
averaged. Not for: scoring learners (``evaluation``), probing (``probe``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from icl_metarl.fewshot.evaluation import MismatchError, check_same_inputs, nearest_shots, plot_family
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_json, atomic_write_text, read_json
from icl_metarl.harness.statistics import t_interval


def _read(dirs: Sequence[str | Path]) -> tuple[str, list[dict]]:
    if len(dirs) < 2:
        raise UsageError(f"pool needs at least 2 output directories (one per training seed), got {len(dirs)}")
    kinds, loaded = set(), []
    for d in map(Path, dirs):
        if (d / "results.json").is_file():
            kinds.add("evaluate")
            loaded.append(read_json(d / "results.json"))
        elif (d / "metrics.json").is_file():
            kinds.add("probe")
            loaded.append(read_json(d / "metrics.json"))
        else:
            raise UsageError(f"{d} holds neither results.json (fewshot evaluate) nor metrics.json (fewshot probe)")
    if len(kinds) > 1:
        raise UsageError("pool mixes evaluations (results.json) and probes (metrics.json); pool each kind alone")
    return kinds.pop(), loaded


# ------------------------------------------------------------------------------------ evaluations
def pool_evaluations(results: Sequence[dict], names: Sequence[str]) -> dict:
    """Per (family, learner, shots): the seeds' MSEs, their mean and t-interval; refuses mismatched test sets."""
    first = results[0]
    for name, r in zip(names, results):
        for key in ("settings", "families", "trained_on"):
            if r[key] != first[key]:
                raise MismatchError(f"{name} was evaluated with {key} {r[key]!r}, {names[0]} with {first[key]!r}: "
                                    "pool evaluations of one test set only")
    check_same_inputs([rec | {"learner": f"{name}:{rec['learner']}"} for name, r in zip(names, results)
                       for rec in r["records"]])
    cells: dict[tuple[str, str, int], list[dict]] = {}
    for r in results:
        for rec in r["records"]:
            cells.setdefault((rec["family"], rec["learner"], rec["shots"]), []).append(rec)
    rows = []
    for (family, learner, shots), recs in cells.items():
        if len(recs) != len(results):
            raise MismatchError(f"learner {learner!r} is missing from {len(results) - len(recs)} of the pooled "
                                f"evaluations ({family}, K={shots}); pool runs that trained the same learners")
        diverged = [rec["nonfinite_tasks"] for rec in recs]
        mses = [rec["mse"] for rec in recs]
        mean, half = t_interval(mses) if not any(diverged) else (math.nan, math.nan)
        rows.append({"family": family, "learner": learner, "shots": shots, "per_seed": mses,
                     "diverged_tasks": diverged, "tasks": recs[0]["tasks"], "mean": mean, "ci95": half})
    budgets = {name: r["budgets"] for name, r in zip(names, results)}
    return {"kind": "evaluate", "runs": list(names), "trained_on": first["trained_on"], "families": first["families"],
            "settings": first["settings"], "training_shots": first["training_shots"], "budgets": budgets,
            "rows": rows}


def _cell(row: dict) -> str:
    if any(row["diverged_tasks"]):
        return "diverged (" + ", ".join(f"{d}/{row['tasks']}" for d in row["diverged_tasks"]) + " tasks)"
    per = ", ".join(f"{v:.3g}" for v in row["per_seed"])
    return f"**{row['mean']:.3g}** ± {row['ci95']:.2g} ({per})"


def _plot_family(pooled: dict, family: str, out: Path) -> str:
    """The evaluator's MSE-against-shots plot, drawn from the seeds' means and t-intervals."""
    records = [{"learner": r["learner"], "family": r["family"], "shots": r["shots"], "mse": r["mean"],
                "ci95": 0.0 if math.isnan(r["ci95"]) else r["ci95"]} for r in pooled["rows"]]
    shim = {"records": records, "training_shots": pooled["training_shots"], "trained_on": pooled["trained_on"],
            "budgets": next(iter(pooled["budgets"].values()))}
    return plot_family(shim, family, out, note=f"; mean of {len(pooled['runs'])} training seeds", prefix="pooled-")


def evaluation_markdown(pooled: dict, plots: dict[str, str]) -> str:
    s, n = pooled["settings"], len(pooled["runs"])
    lines = [f"# Few-shot regression pooled over {n} training seeds (trained on {pooled['trained_on']})", "",
             f"Runs: {', '.join(pooled['runs'])}. Every run scored the same {s['tasks']} test tasks x {s['queries']} "
             f"query points (seed {s['seed']}; checked by fingerprint). Cell: **mean over training seeds** ± 95% "
             f"t half-width with the seed as the unit ({n - 1} degrees of freedom), then each seed's MSE.", ""]
    for family in pooled["families"]:
        rows = [r for r in pooled["rows"] if r["family"] == family]
        shots = sorted({r["shots"] for r in rows})
        cell = {(r["learner"], r["shots"]): _cell(r) for r in rows}
        learners = list(dict.fromkeys(r["learner"] for r in rows))
        lines += [f"## {family}", "", "| learner | " + " | ".join(f"K={k}" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        lines += [f"| {name} | " + " | ".join(cell[(name, k)] for k in shots) + " |" for name in learners]
        lines += ["", f"![{plots[family]}]({plots[family]})", ""]
    fams = pooled["families"]
    if len(fams) > 1:  # who degrades least: each seed's MSE on a shifted family over its MSE on the training one
        k = nearest_shots(s["shots"], pooled["training_shots"]["gradient"])
        cell = {(r["learner"], r["family"]): r for r in pooled["rows"] if r["shots"] == k}
        lines += [f"## Out of distribution at K={k}: MSE on each family / MSE on {fams[0]}, mean over seeds", "",
                  "| learner | " + " | ".join(fams[1:]) + " |", "|---|" + "---|" * (len(fams) - 1)]
        for name in dict.fromkeys(r["learner"] for r in pooled["rows"]):
            base = cell.get((name, fams[0]))
            ratios = []
            for f in fams[1:]:
                shifted = cell.get((name, f))
                if base is None or shifted is None or any(base["diverged_tasks"]) or any(shifted["diverged_tasks"]):
                    ratios.append("diverged")
                else:
                    r = [a / b for a, b in zip(shifted["per_seed"], base["per_seed"])]
                    ratios.append(f"{np.mean(r):.3g} ({', '.join(f'{x:.3g}' for x in r)})")
            lines.append(f"| {name} | " + " | ".join(ratios) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- probes
def pool_probes(metrics: Sequence[dict], names: Sequence[str]) -> dict:
    """Per (shots, gradient steps): the seeds' relative error and cosines, mean and t-interval; per seed the
    k ranked most similar."""
    first = metrics[0]
    for name, m in zip(names, metrics):
        for key in ("settings", "family"):
            if m[key] != first[key]:
                raise MismatchError(f"{name} was probed with {key} {m[key]!r}, {names[0]} with {first[key]!r}")
    rows = []
    for k in sorted(first["shots"], key=int):
        for i, ref in enumerate(first["shots"][k]["rows"]):
            row = {"shots": int(k), "gd_steps": ref["gd_steps"],
                   "best_k": [m["shots"][k]["ranking"][0] for m in metrics]}
            for key in ("relative_error", "prediction_cosine", "sensitivity_cosine"):
                values = [m["shots"][k]["rows"][i][key] for m in metrics]
                mean, half = t_interval(values)
                row[key] = {"per_seed": values, "mean": mean, "ci95": half}
            rows.append(row)
    return {"kind": "probe", "runs": list(names), "family": first["family"], "reference": first["reference"],
            "settings": first["settings"], "rows": rows}


def probe_markdown(pooled: dict) -> str:
    n = len(pooled["runs"])
    lines = [f"# In-context against gradient descent, {pooled['family']}, pooled over {n} training seeds", "",
             f"Runs: {', '.join(pooled['runs'])}. Reference: {pooled['reference']}. Cell: mean over training seeds "
             f"± 95% t half-width (seed as the unit). 'Most similar k' lists each seed's best-ranked k.", ""]
    for k in sorted({r["shots"] for r in pooled["rows"]}):
        rows = [r for r in pooled["rows"] if r["shots"] == k]
        lines += [f"## K = {k}: most similar k per seed: {', '.join(map(str, rows[0]['best_k']))}", "",
                  "| k | relative error | prediction cosine | sensitivity cosine |", "|---|---|---|---|"]
        fmt = lambda v: f"{v['mean']:.3g} ± {v['ci95']:.2g}"  # noqa: E731
        lines += [f"| {r['gd_steps']} | {fmt(r['relative_error'])} | {fmt(r['prediction_cosine'])} | "
                  f"{fmt(r['sensitivity_cosine'])} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- command
def pool_command(dirs: Sequence[str], out) -> None:
    """``icl-metarl fewshot pool``: pooled.json and pooled.md (and, for evaluations, one plot per family)."""
    kind, loaded = _read(dirs)
    names = [Path(d).name for d in dirs]
    if len(set(names)) != len(names):
        names = [str(d) for d in dirs]
    out = Path(out)
    if kind == "evaluate":
        pooled = pool_evaluations(loaded, names)
        text = evaluation_markdown(pooled, {f: _plot_family(pooled, f, out) for f in pooled["families"]})
    else:
        pooled = pool_probes(loaded, names)
        text = probe_markdown(pooled)
    atomic_write_json(out / "pooled.json", pooled)
    atomic_write_text(out / "pooled.md", text)
    print(f"wrote {out / 'pooled.json'} and {out / 'pooled.md'}")
