"""The one few-shot evaluator: every learner scores the same test tasks and the same query points.

A test set draws its tasks, a pool of support points and the query points once from a seed; K shots
are the first K points of the pool, for every learner. A learner is anything with a ``name`` and
``predict(support_x, support_y, query_x) -> (T, Q)``: the in-context regressor, a gradient learner after
the inner steps it meta-trained with (another count: a separate, labelled row), a reference solver. The
evaluator fingerprints the inputs it hands each learner and stops if two learners were given different
points. MSE is taken against the noise-free task function, with a 95% interval (1.96 standard errors)
over tasks. Not for: training, probing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import functional_call, vmap

from gradient_meta.checkpoint import load_checkpoint
from gradient_meta.config import SinusoidConfig
from gradient_meta.functional import Params, StepSize, adapt_tasks
from gradient_meta.sinusoid import SineNet, mse_loss_fn
from icl_metarl.fewshot import solvers
from icl_metarl.fewshot.config import LEARNERS, MODEL_TYPE, RUN_FILE, FewShotEvalConfig
from icl_metarl.fewshot.model import ICLRegressor
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import (
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
    read_json,
    versions,
)
from icl_metarl.harness.regression_tasks import Family, LinearFamily, get_family, shifted_families
from icl_metarl.harness.statistics import normal_interval


class MismatchError(RuntimeError):
    """Two learners were scored on different tasks or points: their figures cannot stand side by side."""


class Predictor(Protocol):
    name: str

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor: ...


# ------------------------------------------------------------------------------------ test set
@dataclass
class TestSet:
    """Tasks, a support pool and query points of one family, drawn once from ``seed``."""

    family: str
    seed: int
    support_x: Tensor  # (T, Kmax, d)
    support_y: Tensor  # (T, Kmax, 1), noisy as the family draws them
    query_x: Tensor  # (T, Q, d)
    query_f: Tensor  # (T, Q, 1): the noise-free task function, what predictions are scored against

    @property
    def max_shots(self) -> int:
        return self.support_x.shape[1]

    def inputs(self, shots: int) -> tuple[Tensor, Tensor, Tensor]:
        """What a learner sees at ``shots``: the first ``shots`` support points and the query inputs."""
        return self.support_x[:, :shots], self.support_y[:, :shots], self.query_x


def make_test_set(family: Family, n_tasks: int, max_shots: int, n_query: int, seed: int) -> TestSet:
    g = torch.Generator().manual_seed(seed)
    tasks = family.sample_tasks(n_tasks, g)
    sx, sy = family.sample_points(tasks, max_shots, g)
    qx = family.sample_inputs(n_tasks, n_query, g)
    return TestSet(family.name, seed, sx, sy, qx, family.function(tasks, qx))


def fingerprint(*tensors: Tensor) -> str:
    """sha256 of the tensors' shapes and values: equal fingerprints, equal inputs."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_inputs(records: Sequence[dict]) -> None:
    """Every learner must have been handed the same inputs at each (family, shots); else MismatchError."""
    seen: dict[tuple, tuple[str, str]] = {}
    for r in records:
        key = (r["family"], r["shots"])
        first = seen.setdefault(key, (r["learner"], r["inputs"]))
        if first[1] != r["inputs"]:
            raise MismatchError(f"{r['learner']!r} and {first[0]!r} were scored on different points at "
                                f"{r['family']}, {r['shots']} shots (input fingerprints {r['inputs']} != {first[1]})")


def score(predictors: Sequence[Predictor], test: TestSet, shots: Sequence[int]) -> list[dict]:
    """One record per (learner, shots): MSE against the task function, its interval, the input fingerprint."""
    if max(shots) > test.max_shots:
        raise UsageError(f"shots {max(shots)} exceed the test set's support pool of {test.max_shots}")
    records = []
    for p in predictors:
        for k in shots:
            sx, sy, qx = (t.clone() for t in test.inputs(k))  # a learner that writes into its inputs hurts no one
            inputs = fingerprint(sx, sy, qx)
            with torch.no_grad():
                pred = p.predict(sx, sy, qx)
            if pred.shape != qx.shape[:2]:
                raise RuntimeError(f"learner {p.name!r} returned predictions {tuple(pred.shape)}, "
                                   f"expected {tuple(qx.shape[:2])}")
            per_task = ((pred.double() - test.query_f[..., 0].double()) ** 2).mean(1)  # (T,)
            mse, ci = map(float, normal_interval(per_task.detach().numpy()))  # 1.96 standard errors over tasks
            records.append({"learner": p.name, "family": test.family, "shots": k, "mse": mse, "ci95": ci,
                            "tasks": len(per_task), "nonfinite_tasks": int((~per_task.isfinite()).sum()),
                            "queries": qx.shape[1], "inputs": inputs})
    check_same_inputs(records)
    return records


# ------------------------------------------------------------------------------------- learners
@dataclass
class FunctionPredictor:
    """A learner given as a function of (support_x, support_y, query_x)."""

    name: str
    fn: Callable[[Tensor, Tensor, Tensor], Tensor]

    def predict(self, support_x, support_y, query_x) -> Tensor:
        return self.fn(support_x, support_y, query_x)


@dataclass
class GradientPredictor:
    """A gradient learner's initialisation after ``steps`` SGD steps on the support set (its step sizes)."""

    name: str
    net: nn.Module
    params: Params
    step_size: StepSize
    steps: int

    def predict(self, support_x, support_y, query_x) -> Tensor:
        t = support_x.shape[0]
        # torch.func.grad inside adapt_tasks differentiates even under the evaluator's no_grad
        adapted = adapt_tasks(mse_loss_fn(self.net), self.params, (support_x, support_y), self.step_size,
                              self.steps) if self.steps else \
            {k: v.detach().expand(t, *v.shape) for k, v in self.params.items()}
        return vmap(lambda p, x: functional_call(self.net, p, (x,)))(adapted, query_x)[..., 0]  # (T, Q)


def reference_predictors(family: Family) -> list[Predictor]:
    """The family's reference solvers: least squares and Bayes ridge (lambda = noise variance / prior
    variance of w) for linear tasks, k-NN and a GP for sinusoids (RBF length scale 1, signal variance E[A^2]/2 of the family, noise variance 1e-2 + noise^2)."""
    if isinstance(family, LinearFamily):
        lam = family.noise_std**2 / family.w_scale**2  # ridge = posterior mean under w ~ N(0, w_scale^2 I)
        return [FunctionPredictor("least squares", solvers.least_squares),
                FunctionPredictor("ridge (Bayes)", lambda sx, sy, qx: solvers.ridge(sx, sy, qx, lam))]
    lo, hi = family.amplitude
    signal = (lo * lo + lo * hi + hi * hi) / 6  # E[A^2] / 2 for A uniform in [lo, hi]
    noise = 1e-2 + family.noise_std**2
    return [FunctionPredictor("3-NN", lambda sx, sy, qx: solvers.nearest_neighbours(sx, sy, qx, 3)),
            FunctionPredictor("GP (RBF, l=1)", lambda sx, sy, qx: solvers.gaussian_process(sx, sy, qx, 1.0, signal,
                                                                                          noise))]


def load_gradient(path: Path) -> tuple[SinusoidConfig, nn.Module, Params, StepSize]:
    """A ``gradient_meta.sinusoid`` checkpoint: its settings, network, initialisation and step sizes."""
    params, step_sizes, saved, _ = load_checkpoint(path)
    if saved.get("kind") != "sinusoid":
        raise UsageError(f"{path} is a {saved.get('kind')!r} checkpoint, not a few-shot regression one")
    config = SinusoidConfig(**saved["config"])
    return config, SineNet(config.hidden, get_family(config.family).x_dim), params, step_sizes or config.inner_lr


def run_family(run: str | Path) -> str:
    """The training family of a run directory (written by ``fewshot train``)."""
    path = Path(run) / RUN_FILE
    if not path.is_file():
        raise UsageError(f"{run} is not a few-shot run directory (no {RUN_FILE}); make one with `icl-metarl fewshot "
                         f"train --out {run}`")
    return read_json(path)["family"]


def step_label(name: str, steps: int, trained: int) -> str:
    """A gradient learner's row: "maml (1 step)" at the count it meta-trained with, "maml (10 steps, trained
    with 1)" at another."""
    label = f"{name} ({steps} step{'s' if steps != 1 else ''}"
    return label + (")" if steps == trained else f", trained with {trained})")


def load_run(run: str | Path, extra_steps: Sequence[int] = ()) -> tuple[list[Predictor], dict]:
    """Every trained learner of a run and their budgets: a gradient one at the inner-step count it meta-trained
    with, and once more per other count of ``extra_steps``."""
    run = Path(run)
    predictors, budgets = [], {}
    for name in LEARNERS:
        path = run / name
        if not (path / "config.json").is_file():
            continue
        if read_json(path / "config.json").get("model_type") == MODEL_TYPE:
            model = ICLRegressor.from_pretrained(path)
            predictors.append(FunctionPredictor("in-context", model.predict))
            budgets["in-context"] = read_json(path / "training.json") if (path / "training.json").is_file() else {}
            continue
        config, net, params, step = load_gradient(path)
        trained = config.inner_steps
        for steps in [trained, *(k for k in extra_steps if k != trained)]:
            label = step_label(name, steps, trained)
            predictors.append(GradientPredictor(label, net, params, step, steps))
            budgets[label] = {"optimizer_steps": config.iterations, "tasks_seen": config.iterations * config.meta_batch,
                              "train_seconds": read_json(path / "config.json").get("train_seconds")}
    if not predictors:
        raise UsageError(f"{run} holds no trained learner (none of {', '.join(LEARNERS)})")
    return predictors, budgets


# ---------------------------------------------------------------------------------------- command
def evaluate_run(run: str | Path, config: FewShotEvalConfig) -> dict:
    """Score every learner of ``run`` (and the reference solvers) on the configured family or families."""
    trained_on = run_family(run)
    first = get_family(config.family or trained_on)
    names = [first.name] + (shifted_families(first.name) if config.shifted else [])
    families = [get_family(n) for n in names]
    run_config = read_json(Path(run) / RUN_FILE)["config"]
    if any(f.x_dim != get_family(trained_on).x_dim for f in families):
        raise UsageError(f"family {first.name!r} has {first.x_dim} input dimension(s); the run was trained on "
                         f"{trained_on!r} with {get_family(trained_on).x_dim}")
    predictors, budgets = load_run(run, config.extra_steps)
    records = []
    for family in families:
        test = make_test_set(family, config.tasks, max(config.shots), config.queries, config.seed)
        extra = reference_predictors(family) if config.references else []
        records += score([*predictors, *extra], test, config.shots)
    return {"run": str(run), "trained_on": trained_on, "families": names,
            "training_shots": training_shots(run_config),
            "settings": {"tasks": config.tasks, "queries": config.queries, "seed": config.seed,
                         "shots": list(config.shots), "extra_steps": list(config.extra_steps)},
            "budgets": budgets, "records": records, "versions": versions()}


def evaluate_command(run: str, config: FewShotEvalConfig, out) -> None:
    """``icl-metarl fewshot evaluate``: results.json, report.md and one MSE-against-shots plot per family."""
    results = evaluate_run(run, config)
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    report = write_report(results, out)
    print(f"wrote {out / 'results.json'} and {report}")


# ----------------------------------------------------------------------------------------- report
def training_shots(run_config: dict) -> dict[str, list[int]]:
    """[fewest, most] support points each kind of learner trained on: the same range for both; runs from
    before issue 35 meta-trained the gradient learners at one K (their ``shots``)."""
    icl = [1, run_config["max_shots"]]
    return {"gradient": [run_config["shots"]] * 2 if "shots" in run_config else icl, "in-context": icl}


def shot_range(trained: int | Sequence[int]) -> tuple[int, int]:
    """(fewest, most) of a ``training_shots`` entry (a single K in results written before ranges)."""
    return (trained, trained) if isinstance(trained, int) else (int(trained[0]), int(trained[-1]))


def nearest_shots(shots: Sequence[int], trained: int | Sequence[int]) -> int:
    """The evaluated shot count the gradient learners trained at: the largest inside their range, else the
    nearest to it (the smaller on a tie)."""
    lo, hi = shot_range(trained)
    return min(shots, key=lambda k: (max(lo - k, k - hi, 0), -k if lo <= k <= hi else k))


def _learners(records: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["learner"] for r in records))


def plot_family(results: dict, family: str, out: Path, note: str = "", prefix: str = "") -> str:
    """<prefix>mse-<family>.png: MSE against shots, one line per learner with its 95% band, log scales."""
    recs = [r for r in results["records"] if r["family"] == family]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20"].colors
    lowest = min((r["mse"] for r in recs if math.isfinite(r["mse"]) and r["mse"] > 0), default=1.0)
    for i, name in enumerate(_learners(recs)):
        rs = sorted((r for r in recs if r["learner"] == name), key=lambda r: r["shots"])
        k = np.array([r["shots"] for r in rs])
        m, c = np.array([r["mse"] for r in rs]), np.array([r["ci95"] for r in rs])
        ls = ":" if name in _reference_names(results) else "-"
        ax.plot(k, m, marker="o", ms=3, ls=ls, label=name, color=colours[i % len(colours)])
        ax.fill_between(k, np.maximum(m - c, lowest / 10), m + c, alpha=0.12, color=colours[i % len(colours)])
    marks: dict[int, list[str]] = {}
    for what, trained in results["training_shots"].items():
        lo, k = shot_range(trained)
        marks.setdefault(k, []).append(f"{what} trained at {k if lo == k else f'{lo}..{k}'}")
    for k, labels in marks.items():
        ax.axvline(k, color="grey", ls="--", lw=1)
        ax.annotate("; ".join(labels), (k, 0.98), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    va="top", ha="right")
    ax.set_ylim(bottom=lowest / 3)  # a band reaching below zero would otherwise stretch the log axis
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("support points (shots)")
    ax.set_ylabel("MSE against the task function")
    ax.set_title(f"{family} (trained on {results['trained_on']}{note})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"{prefix}mse-{family}.png"
    atomic_write_figure(fig, out / name)
    return name


def _reference_names(results: dict) -> set[str]:
    return {r["learner"] for r in results["records"]} - set(results["budgets"])


def _cell(r: dict) -> str:
    if r.get("nonfinite_tasks"):  # a gradient learner whose steps diverged: said, not averaged away
        return f"diverged on {r['nonfinite_tasks']}/{r['tasks']} tasks"
    return f"{r['mse']:.3g} ± {r['ci95']:.2g}"


def _training_note(results: dict) -> str:
    """The support points each learner trained on, and the inner steps the gradient learners are scored at."""
    (glo, ghi), (ilo, ihi) = (shot_range(results["training_shots"][w]) for w in ("gradient", "in-context"))
    shots = f"Every learner trained on {glo}..{ghi} support points" if (glo, ghi) == (ilo, ihi) else \
        f"Gradient learners meta-trained at K={glo if glo == ghi else f'{glo}..{ghi}'}; the in-context regressor on " \
        f"{ilo}..{ihi} support points"
    return (f"{shots}. A gradient learner's row adapts with the inner steps it meta-trained with; a row \"n steps, "
            "trained with m\" adapts with another count, beside it.")


def report_markdown(results: dict, plots: dict[str, str]) -> str:
    s = results["settings"]
    lines = [f"# Few-shot regression: run {results['run']} (trained on {results['trained_on']})", "",
             f"{s['tasks']} test tasks x {s['queries']} query points (seed {s['seed']}), the same tasks and points for "
             "every learner (checked by fingerprint); K shots are the first K points of one support pool. MSE against "
             "the noise-free task function, mean ± 95% half-width (1.96 standard errors over tasks). "
             f"{_training_note(results)}", "",
             "## Training budgets", "", "| learner | optimizer steps | tasks seen | seconds (in-context: CPU; gradient: wall) |",
             "|---|---|---|---|"]
    for name, b in results["budgets"].items():
        secs = b.get("cpu_seconds", b.get("train_seconds"))
        lines.append(f"| {name} | {b.get('optimizer_steps', '?')} | {b.get('tasks_seen', '?')} | {secs} |")
    lines += ["", "Reference solvers (no training): " + ", ".join(sorted(_reference_names(results))) + ".", ""]
    for family in results["families"]:
        recs = [r for r in results["records"] if r["family"] == family]
        shots = sorted({r["shots"] for r in recs})
        cell = {(r["learner"], r["shots"]): _cell(r) for r in recs}
        lines += [f"## {family}", "", "| learner | " + " | ".join(f"K={k}" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        lines += [f"| {n} | " + " | ".join(cell[(n, k)] for k in shots) + " |" for n in _learners(recs)]
        lines += ["", f"![{plots[family]}]({plots[family]})", ""]
    if len(results["families"]) > 1:
        k = nearest_shots(results["settings"]["shots"], results["training_shots"]["gradient"])
        fams = results["families"]
        mse = {(r["learner"], r["family"]): r["mse"] if not r.get("nonfinite_tasks") else math.nan
               for r in results["records"] if r["shots"] == k}
        if all((n, fams[0]) in mse for n in _learners(results["records"])):
            lines += [f"## Out of distribution at K={k}: MSE on each family / MSE on {fams[0]}", "",
                      "| learner | " + " | ".join(fams[1:]) + " |", "|---|" + "---|" * (len(fams) - 1)]
            for n in _learners(results["records"]):
                ratios = [mse[(n, f)] / mse[(n, fams[0])] for f in fams[1:]]
                lines.append(f"| {n} | " + " | ".join(f"{x:.3g}" if math.isfinite(x) else "diverged" for x in ratios)
                             + " |")
            lines.append("")
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".", ""]
    return "\n".join(lines)


def write_report(results: dict, out: str | Path) -> Path:
    """report.md and the plots; refuses results whose learners saw different points."""
    check_same_inputs(results["records"])
    out = Path(out)
    plots = {f: plot_family(results, f, out) for f in results["families"]}
    path = out / "report.md"
    atomic_write_text(path, report_markdown(results, plots))
    return path
