"""Mechanism probe: does the in-context prediction behave like k gradient steps on the support set?

For each number of shots K, the in-context predictor and a reference learner after k = 1, 2, ... SGD
steps on the same support set are compared through their predictions at the query points and their
sensitivities d prediction(x_q) / d y_i to each support target (von Oswald et al. 2023 compare the same
two). The reference is a linear model from w = 0 (von Oswald's) or a gradient learner's initialisation;
per k its step size is the one of a grid whose predictions are closest to the in-context ones. Attention
shares per support point (the in-context regressor, eager attention) use the attention statistics of
``icl_metarl.probes``. Not for: scoring (``evaluation.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from gradient_meta.functional import Params, StepSize, sgd_update
from gradient_meta.sinusoid import mse_loss_fn
from icl_metarl.fewshot.config import FewShotProbeConfig
from icl_metarl.fewshot.evaluation import load_gradient, make_test_set, run_family
from icl_metarl.fewshot.model import ICLRegressor
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import (
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
    versions,
)
from icl_metarl.harness.regression_tasks import Family, LinearFamily, get_family
from icl_metarl.probes.attention_statistics import attention_entropy, key_mass


# ------------------------------------------------------------------------------ the reference
class LinearModel(nn.Module):
    """y = w.x, w starting at 0: the learner of von Oswald et al.'s construction."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., 1)
        return (x @ self.w)[..., None]


@dataclass
class Reference:
    """A learner k gradient steps from ``params`` on the support loss, stepping ``scale`` x ``step_size``."""

    name: str
    net: nn.Module
    params: Params
    step_size: StepSize
    loss: Callable


def half_mse_loss(model: nn.Module):
    """(1/2K) sum_j (f(x_j) - y_j)^2: the loss whose gradient step von Oswald et al.'s layer computes."""
    def loss(params: Params, batch) -> Tensor:
        x, y = batch
        return 0.5 * ((functional_call(model, params, (x,)) - y) ** 2).mean()
    return loss


def linear_reference(dim: int) -> Reference:
    net = LinearModel(dim)
    return Reference("linear model from w = 0", net, {"w": torch.zeros(dim)}, 1.0, half_mse_loss(net))


def checkpoint_reference(path: Path) -> Reference:
    config, net, params, step = load_gradient(path)
    return Reference(f"{config.algo} initialisation ({path.name})", net, params, step, mse_loss_fn(net))


def _scaled(step: StepSize, scale: float) -> StepSize:
    return {k: v * scale for k, v in step.items()} if isinstance(step, dict) else step * scale


def _unrolled(ref: Reference, scale: float, steps: Sequence[int]):
    """One task's predictions after each of ``steps`` SGD steps: run(y (K, 1), x, xq) -> (S, Q)."""
    lr, wanted = _scaled(ref.step_size, scale), sorted(steps)
    params = {k: v.detach() for k, v in ref.params.items()}

    def run(y, x, xq):
        p, out = params, []
        for step in range(1, wanted[-1] + 1):
            p = sgd_update(p, grad(ref.loss)(p, (x, y)), lr)
            if step in wanted:
                out.append(functional_call(ref.net, p, (xq,))[..., 0])
        return torch.stack(out)

    return run


def gd_predictions(ref: Reference, scale: float, support_x, support_y, query_x, steps: Sequence[int]) -> Tensor:
    """Predictions (T, S, Q) of the reference after each of ``steps`` SGD steps on each task's support."""
    y = support_y.reshape(*support_y.shape[:2], 1)
    return vmap(_unrolled(ref, scale, steps))(y, support_x, query_x).detach()


def gd_sensitivities(ref: Reference, scale: float, support_x, support_y, query_x, steps: Sequence[int]) -> Tensor:
    """d prediction / d support target of the reference after each of ``steps`` steps: (T, S, Q, K).
    Reverse mode through the unrolled steps (S x Q cotangents): costly, so the probe asks only for the
    step size it kept."""
    y = support_y.reshape(*support_y.shape[:2], 1)
    return vmap(jacrev(_unrolled(ref, scale, steps)))(y, support_x, query_x)[..., 0].detach()


def predictor_sensitivities(predict, support_x, support_y, query_x) -> tuple[Tensor, Tensor]:
    """Predictions (T, Q) of any differentiable predictor and d prediction / d support y: (T, Q, K)."""
    y = support_y.reshape(*support_y.shape[:2]).clone().requires_grad_(True)
    with torch.enable_grad():
        pred = predict(support_x, y, query_x)  # (T, Q)
        sens = [torch.autograd.grad(pred[:, q].sum(), y, retain_graph=True)[0] for q in range(pred.shape[1])]
    return pred.detach(), torch.stack(sens, 1)  # (T, Q), (T, Q, K)


# ------------------------------------------------------------------------------------- measures
def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of two (T, ...) batches per task: (T,)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)


def relative_error(icl_pred: Tensor, gd_pred: Tensor) -> float:
    """Mean squared difference of predictions over the mean squared in-context prediction (0: identical)."""
    return float(((icl_pred.double() - gd_pred.double()) ** 2).mean() / (icl_pred.double() ** 2).mean().clamp(min=1e-12))


def similarity(icl_pred: Tensor, icl_sens: Tensor, gd_pred: Tensor, gd_sens: Tensor) -> dict:
    """How alike two predictors are on one support set: relative prediction error (0: the same
    predictions), cosine of predictions and of sensitivities per task (1: the same direction)."""
    err = relative_error(icl_pred, gd_pred)
    return {"relative_error": err, "prediction_cosine": float(_cosine(icl_pred, gd_pred).mean()),
            "sensitivity_cosine": float(_cosine(icl_sens, gd_sens).mean())}


def attention_shares(model: ICLRegressor, support_x, support_y, query_x) -> dict:
    """Per layer (L, H): the query tokens' attention on the support (the rest is on themselves), its
    entropy over the support / log K, and the share on the nearest support point over a uniform share;
    and the mean share per support position (L, K)."""
    k = support_x.shape[1]
    with torch.no_grad():
        out = model(support_x, support_y, query_x, output_attentions=True)
    nearest = torch.cdist(query_x, support_x).argmin(-1)  # (T, Q)
    stats = {"support_share": [], "entropy_normalised": [], "nearest_enrichment": [], "position_share": []}
    for attn in out.attentions:  # (T, H, K+M, K+M)
        rows = attn[:, :, k:]  # (T, H, Q, K+M): the query tokens
        on_support = torch.zeros(rows.shape[-1], dtype=torch.bool)
        on_support[:k] = True
        support = key_mass(rows, on_support[None].expand(rows.shape[0], -1))  # (T, H, Q)
        within = rows[..., :k] / support[..., None].clamp(min=1e-12)  # (T, H, Q, K), sums to 1 over K
        near = torch.nn.functional.one_hot(nearest, rows.shape[-1]).bool()  # (T, Q, K+M)
        stats["support_share"].append(support.mean((0, 2)))
        stats["entropy_normalised"].append((attention_entropy(within) / math.log(max(k, 2))).mean((0, 2)))
        stats["nearest_enrichment"].append((key_mass(rows, near) / support.clamp(min=1e-12) * k).mean((0, 2)))
        stats["position_share"].append(within.mean((0, 1, 2)))
    return {name: torch.stack(v).tolist() for name, v in stats.items()}


# ------------------------------------------------------------------------------------------ probe
def probe_predictor(predict, family: Family, reference: Reference, config: FewShotProbeConfig,
                    model: ICLRegressor | None = None) -> dict:
    """Compare ``predict`` (any differentiable in-context predictor) with ``reference`` after k steps.

    Per K: one row per k (best step size of the grid by relative error) and the k ranked by relative
    error, most similar first; with ``model`` (eager attention), its attention shares too.
    """
    test = make_test_set(family, config.tasks, max(config.shots), config.queries, config.seed)
    per_shots = {}
    for k in config.shots:
        sx, sy, qx = test.inputs(k)
        icl_pred, icl_sens = predictor_sensitivities(predict, sx, sy, qx)
        best: dict[int, tuple[float, float]] = {}  # k -> (relative error, step-size scale)
        for scale in config.step_sizes:
            gd_pred = gd_predictions(reference, scale, sx, sy, qx, config.gd_steps)
            for i, steps in enumerate(sorted(config.gd_steps)):
                err = relative_error(icl_pred, gd_pred[:, i])
                if math.isfinite(err) and err < best.get(steps, (math.inf, 0.0))[0]:
                    best[steps] = (err, scale)
        rows = {}
        for steps, (_, scale) in best.items():
            gd_pred = gd_predictions(reference, scale, sx, sy, qx, [steps])[:, 0]
            gd_sens = gd_sensitivities(reference, scale, sx, sy, qx, [steps])[:, 0]
            rows[steps] = {"gd_steps": steps, "step_size_scale": scale,
                           **similarity(icl_pred, icl_sens, gd_pred, gd_sens)}
        entry = {"rows": [rows[s] for s in sorted(rows)],
                 "ranking": [r["gd_steps"] for r in sorted(rows.values(), key=lambda r: r["relative_error"])]}
        if model is not None:
            entry["attention"] = attention_shares(model, sx, sy, qx)
        per_shots[k] = entry
    return {"family": family.name, "reference": reference.name, "shots": per_shots,
            "settings": {"tasks": config.tasks, "queries": config.queries, "seed": config.seed,
                         "gd_steps": list(config.gd_steps), "step_sizes": list(config.step_sizes)},
            "versions": versions()}


def resolve_reference(run: Path, family: Family, name: str) -> Reference:
    """The reference a probe compares with: ``linear``, a gradient learner of the run, or ``auto``."""
    if name == "auto":
        if isinstance(family, LinearFamily):
            name = "linear"
        else:
            name = next((n for n in ("maml", "pretrain") if (run / n / "config.json").is_file()), None)
            if name is None:
                raise UsageError(f"{run} has no maml or pretrain checkpoint to compare with; pass --reference linear "
                                 f"or train one (`icl-metarl fewshot train --learners maml`)")
    if name == "linear":
        return linear_reference(family.x_dim)
    if not (run / name / "config.json").is_file():
        raise UsageError(f"{run} has no {name} checkpoint; train it or choose another --reference")
    return checkpoint_reference(run / name)


def probe_command(run: str, config: FewShotProbeConfig, out) -> None:
    """``icl-metarl fewshot probe``: metrics.json, probe.md and plots of one run's in-context regressor."""
    run, out = Path(run), Path(out)
    family = get_family(config.family or run_family(run))
    if not (run / "icl" / "config.json").is_file():
        raise UsageError(f"{run} has no in-context regressor (icl/); train it with `icl-metarl fewshot train "
                         f"--learners icl --out {run}`")
    model = ICLRegressor.from_pretrained(run / "icl", attn_implementation="eager")
    result = probe_predictor(model.predict, family, resolve_reference(run, family, config.reference), config, model)
    atomic_write_json(out / "metrics.json", result)
    path = write_report(result, out)
    print(f"wrote {out / 'metrics.json'} and {path}")


# ----------------------------------------------------------------------------------------- report
def _png(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    atomic_write_figure(fig, path)


def write_report(result: dict, out: str | Path) -> Path:
    """probe.md with one table per number of shots, gd_similarity.png and (with attention) attention.png."""
    out = Path(out)
    shots = sorted(result["shots"], key=int)
    fig = Figure(figsize=(10, 3.5), dpi=100)
    axes = fig.subplots(1, 3)
    for k in shots:
        rows = result["shots"][k]["rows"]
        x = [r["gd_steps"] for r in rows]
        for ax, key in zip(axes, ("relative_error", "prediction_cosine", "sensitivity_cosine")):
            ax.plot(x, [r[key] for r in rows], marker="o", ms=3, label=f"K={k}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("gradient steps k of the reference")
            ax.set_title(key.replace("_", " "), fontsize=9)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    _png(fig, out / "gd_similarity.png")
    figures = ["gd_similarity.png"]
    if "attention" in result["shots"][shots[-1]]:
        att = np.array(result["shots"][shots[-1]]["attention"]["position_share"])  # (L, K)
        fig = Figure(figsize=(6, 3), dpi=100)
        ax = fig.subplots()
        im = ax.imshow(att, aspect="auto", cmap="viridis")
        ax.set_xlabel("support point (order in the context)")
        ax.set_ylabel("layer")
        ax.set_title(f"query attention per support point, K={shots[-1]} (share of the support's)", fontsize=9)
        fig.colorbar(im, ax=ax)
        _png(fig, out / "attention.png")
        figures.append("attention.png")
    lines = [f"# In-context regression against gradient descent: {result['family']}", "",
             f"Reference: {result['reference']}. Per K and k: the step-size scale of the grid "
             f"{result['settings']['step_sizes']} whose predictions are closest; relative error = mean squared "
             "difference of predictions / mean squared in-context prediction (0: identical); cosines per task of "
             "predictions and of sensitivities d prediction / d y_i (1: identical direction), averaged over "
             f"{result['settings']['tasks']} tasks x {result['settings']['queries']} queries (seed "
             f"{result['settings']['seed']}). A step size at the grid's edge may be the grid's limit, not the best "
             "match: widen --step-sizes there.", ""]
    for k in shots:
        entry = result["shots"][k]
        lines += [f"## K = {k}: most similar k first: {', '.join(map(str, entry['ranking']))}", "",
                  "| k | step-size scale | relative error | prediction cosine | sensitivity cosine |", "|---|---|---|---|---|"]
        grid = result["settings"]["step_sizes"]
        edge = lambda scale: " (grid edge)" if len(grid) > 1 and scale in (min(grid), max(grid)) else ""  # noqa: E731
        lines += [f"| {r['gd_steps']} | {r['step_size_scale']:g}{edge(r['step_size_scale'])} | "
                  f"{r['relative_error']:.3g} | {r['prediction_cosine']:.3f} | {r['sensitivity_cosine']:.3f} |"
                  for r in entry["rows"]]
        if "attention" in entry:
            a = entry["attention"]
            lines += ["", "| layer | share on support | entropy / log K | nearest point / uniform |", "|---|---|---|---|"]
            lines += [f"| {layer} | {np.mean(a['support_share'][layer]):.2f} | {np.mean(a['entropy_normalised'][layer]):.2f} | "
                      f"{np.mean(a['nearest_enrichment'][layer]):.2f} |" for layer in range(len(a["support_share"]))]
        lines.append("")
    lines += [f"![{f}]({f})" for f in figures] + [""]
    path = out / "probe.md"
    atomic_write_text(path, "\n".join(lines))
    return path
