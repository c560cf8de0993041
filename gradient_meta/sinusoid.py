"""Few-shot regression with the gradient learners: the sinusoid benchmark of the MAML and Meta-SGD papers.

Tasks come from a family of ``icl_metarl.harness.regression_tasks`` (default MAML's: y = A sin(x - phase),
A in [0.1, 5], phase in [0, pi], x in [-5, 5]; also the Meta-SGD paper's sinusoids and linear regression);
a d-40-40-1 ReLU network. Meta-training (MAML, Meta-SGD, Reptile, or a pretrained-on-all-tasks baseline)
and an evaluation that reports post-adaptation MSE with a 95% confidence interval over test tasks; the
Meta-SGD paper's Table 1 as one command (``icl-metarl fewshot sinusoid train|evaluate|table``).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradient_meta.checkpoint import load_checkpoint, save_checkpoint
from gradient_meta.config import SINUSOID_ALGOS, SinusoidConfig
from gradient_meta.functional import Params, StepSize, adapt_tasks, all_reduce_mean, apply_gradient, local_tasks
from gradient_meta.maml import MAML, MAMLConfig
from gradient_meta.meta_sgd import MetaSGD, init_step_sizes
from gradient_meta.reptile import Reptile, ReptileConfig
from icl_metarl.harness.checkpoint import write_on_main
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_json, read_json
from icl_metarl.harness.regression_tasks import MAML_SINE, Family, get_family
from icl_metarl.harness.statistics import normal_interval


class SineNet(nn.Module):
    """The papers' regressor: 1 -> 40 -> 40 -> 1 with ReLU (``inputs`` -> ... for d-dimensional tasks)."""

    def __init__(self, hidden: int = 40, inputs: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:  # (..., 1) -> (..., 1)
        return self.net(x)


def mse_loss_fn(model: nn.Module):
    """``loss(params, (x, y))`` for one task's (K, 1) inputs and targets, through ``functional_call``."""

    def loss(params: Params, batch) -> Tensor:
        x, y = batch
        return F.mse_loss(functional_call(model, params, (x,)), y)

    return loss


def sample_tasks(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Amplitudes and phases of ``n`` tasks of MAML's family, each (n,)."""
    tasks = MAML_SINE.sample_tasks(n, generator)
    return tasks["amplitude"], tasks["phase"]


def sample_points(amp: Tensor, phase: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``k`` uniform inputs per task of MAML's family and their targets, each (T, k, 1)."""
    return MAML_SINE.sample_points({"amplitude": amp, "phase": phase, "frequency": torch.ones_like(amp)}, k, generator)


def _maml(config: SinusoidConfig, model: nn.Module, accelerator):
    loss = mse_loss_fn(model)
    return MAML(dict(model.named_parameters()), loss, loss, _maml_config(config), accelerator)


def _meta_sgd(config: SinusoidConfig, model: nn.Module, accelerator):
    loss, params = mse_loss_fn(model), dict(model.named_parameters())
    g = torch.Generator().manual_seed(config.seed + 1)
    value = config.inner_lr if config.meta_sgd_init == "constant" else None
    return MetaSGD(params, loss, loss, _maml_config(config), accelerator, init_step_sizes(params, value, generator=g))


def _reptile(config: SinusoidConfig, model: nn.Module, accelerator):
    return Reptile(dict(model.named_parameters()), mse_loss_fn(model),
                   ReptileConfig(config.inner_steps, config.inner_lr, "sgd", config.meta_lr), accelerator)


def _pretrain(config: SinusoidConfig, model: nn.Module, accelerator):
    return Pretrain(dict(model.named_parameters()), mse_loss_fn(model), config.meta_lr, accelerator)


def _maml_config(config: SinusoidConfig) -> MAMLConfig:
    return MAMLConfig(config.inner_steps, config.inner_lr, config.algo == "fomaml", config.meta_lr)


def build_learner(config: SinusoidConfig, model: nn.Module, accelerator=None):
    """The meta-learner for ``config.algo`` around ``model``'s initial weights."""
    return BUILDERS[config.algo](config, model, accelerator)


class Pretrain:
    """The baseline: one network regressed on points of all tasks at once (no adaptation in training)."""

    def __init__(self, params: Params, loss, meta_lr: float, accelerator=None):
        self.params = {k: nn.Parameter(v.detach().clone()) for k, v in params.items()}
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=meta_lr)

        def step(support, query):
            mean_loss = lambda p: vmap(loss, in_dims=(None, 0))(p, support).mean()  # noqa: E731
            p = {k: v.detach() for k, v in self.params.items()}
            g = grad(mean_loss)(p)
            apply_gradient(self.optimizer, self.params, all_reduce_mean(g, accelerator))
            return float(mean_loss(p))

        self.step = step


#: algorithm name -> builder of its learner (MAML, FOMAML and Meta-SGD share MAML's class)
BUILDERS = {"maml": _maml, "fomaml": _maml, "meta-sgd": _meta_sgd, "reptile": _reptile, "pretrain": _pretrain}
assert set(BUILDERS) == set(SINUSOID_ALGOS)


def train(config: SinusoidConfig, accelerator=None, log=print):
    """Meta-train on freshly sampled tasks; returns (model, learner, seconds). Every process samples the
    whole meta-batch from the same seed and keeps its own share, so N processes see the same tasks as one.
    With ``min_shots`` each meta-update draws its K in min_shots..shots first (one K for its tasks)."""
    family = get_family(config.family)
    torch.manual_seed(config.seed)
    model = SineNet(config.hidden, family.x_dim)
    nproc = accelerator.num_processes if accelerator else 1
    share = local_tasks(config.meta_batch, nproc, accelerator.process_index if accelerator else 0)
    learner = build_learner(config, model, accelerator)
    g = torch.Generator().manual_seed(10_000 + config.seed)
    start, running = time.perf_counter(), 0.0
    for it in range(1, config.iterations + 1):
        shots = config.shots if config.min_shots is None else \
            int(torch.randint(config.min_shots, config.shots + 1, (), generator=g))
        tasks = family.sample_tasks(config.meta_batch, g)
        support = family.sample_points(tasks, shots, g)
        query = family.sample_points(tasks, config.shots, g)
        running += learner.step(tuple(t[share] for t in support), tuple(t[share] for t in query))
        if config.log_every and it % config.log_every == 0:
            log(f"iter {it}: train query MSE {running / config.log_every:.3f} "
                f"({time.perf_counter() - start:.0f}s)")
            running = 0.0
    return model, learner, time.perf_counter() - start


def evaluate(model: nn.Module, params: Params, step_size: StepSize, shots: int, steps: int = 1,
             n_tasks: int = 1000, n_query: int = 100, seed: int = 1234, family: Family = MAML_SINE) -> dict:
    """Post-adaptation MSE on ``n_tasks`` test tasks: adapt with ``steps`` SGD steps on ``shots`` points,
    score ``n_query`` fresh points. Returns mean, 95% CI half-width (1.96 standard errors over tasks).
    (``icl_metarl.fewshot.evaluation`` scores every learner, in-context ones too, on one test set.)"""
    g = torch.Generator().manual_seed(seed)
    tasks = family.sample_tasks(n_tasks, g)
    support = family.sample_points(tasks, shots, g)
    qx, qy = family.sample_points(tasks, n_query, g)
    adapted = adapt_tasks(mse_loss_fn(model), params, support, step_size, steps) if steps else \
        {k: v.detach().expand(n_tasks, *v.shape) for k, v in params.items()}
    with torch.no_grad():
        pred = torch.func.vmap(lambda p, x: functional_call(model, p, (x,)))(adapted, qx)  # (T, Q, 1)
        per_task = ((pred - qy) ** 2).mean(dim=(1, 2))  # (T,)
    mean, ci = map(float, normal_interval(per_task.numpy()))  # the one statistics module's interval
    return {"mse": mean, "ci95": ci, "shots": shots, "steps": steps, "tasks": n_tasks, "query_points": n_query}


def learned_step_size(config: SinusoidConfig, learner) -> StepSize:
    """The step size evaluation adapts with: Meta-SGD's learned tensors, else the configured scalar."""
    return getattr(learner, "step_sizes", None) or config.inner_lr


def save(out: str | Path, config: SinusoidConfig, learner, seconds: float) -> None:
    step = learned_step_size(config, learner)
    save_checkpoint(out, learner.params, step if isinstance(step, dict) else None,
                    {"kind": "sinusoid", "config": asdict(config), "train_seconds": round(seconds, 1)})


def train_command(config: SinusoidConfig, out, eval_tasks: int = 1000) -> None:
    """``icl-metarl fewshot sinusoid train``; under ``accelerate launch`` each process takes a share of the tasks."""
    # Tasks live on the CPU (a 40-unit net); gloo all-reduces CPU tensors between processes.
    accelerator = Accelerator(cpu=True)
    main = accelerator.is_main_process
    model, learner, seconds = train(config, accelerator, log=print if main else (lambda m: None))
    write_on_main(accelerator, lambda: save(out, config, learner, seconds))
    if main:
        res = evaluate(model, learner.params, learned_step_size(config, learner), config.shots,
                       config.inner_steps, eval_tasks, family=get_family(config.family))
        print(f"{config.algo} K={config.shots}: {config.iterations} iterations in {seconds:.0f}s on "
              f"{accelerator.num_processes} process(es); test MSE after {config.inner_steps} step(s) "
              f"{res['mse']:.3f} ± {res['ci95']:.3f} (95% CI, {res['tasks']} tasks); checkpoint {out}")


def evaluate_command(checkpoint, options) -> None:
    """``icl-metarl fewshot sinusoid evaluate``: post-adaptation MSE of a checkpoint over new test tasks."""
    params, step_sizes, saved, _ = load_checkpoint(checkpoint)
    if saved.get("kind") != "sinusoid":
        raise UsageError(f"checkpoint {checkpoint!r} is a {saved.get('kind')!r} checkpoint, not 'sinusoid'")
    config = SinusoidConfig(**saved["config"])
    shots = options.shots if options.shots is not None else config.shots
    if shots < 1 or options.steps < 0 or options.tasks < 2:
        raise UsageError(f"need --shots >= 1, --steps >= 0, --tasks >= 2; got {shots}, {options.steps}, {options.tasks}")
    family = get_family(config.family)
    model = SineNet(config.hidden, family.x_dim)
    res = evaluate(model, params, step_sizes or config.inner_lr, shots, options.steps, options.tasks, seed=options.seed,
                   family=family)
    print(f"{config.algo} K={shots}, {options.steps} step(s): test MSE {res['mse']:.3f} ± {res['ci95']:.3f} "
          f"(95% CI over {res['tasks']} tasks, {res['query_points']} query points each)")


#: Li et al. 2017, "Meta-SGD", Table 1: MSE after one step, (mean, 95% CI) per K, as the paper prints them
PAPER_TABLE = {"maml": {5: (1.13, 0.18), 10: (0.77, 0.11), 20: (0.48, 0.08)},
               "meta-sgd": {5: (0.90, 0.16), 10: (0.53, 0.09), 20: (0.31, 0.05)}}


def table_command(options, out) -> None:
    """``icl-metarl fewshot sinusoid table``: train each of ``options.algos`` at each K of ``options.shots`` with
    one inner step (checkpoints ``out/ALGO-kK``), score each on the same test tasks, write ``out/results.json``
    after every run and print the table beside the paper's; with ``options.report``, only the table of earlier
    runs' results.json files."""
    rows, shots, algos, iterations = [], tuple(options.shots), tuple(options.algos), [options.iterations]
    for algo in algos:
        if algo not in SINUSOID_ALGOS:
            raise UsageError(f"--algos: {algo!r} is not one of {', '.join(SINUSOID_ALGOS)}")
    if options.report:
        for path in options.report:
            if not Path(path).is_file():
                raise UsageError(f"--report {path}: no such results.json")
            rows += read_json(path)
        shots = tuple(sorted({r["shots"] for r in rows}))
        algos = tuple(a for a in algos if any(r["algo"] == a for r in rows))
        iterations = sorted({r["config"]["iterations"] for r in rows})
    for k in () if options.report else shots:
        for algo in algos:
            config = SinusoidConfig(algo=algo, shots=k, iterations=options.iterations, seed=options.seed,
                                    log_every=5000)
            model, learner, seconds = train(config, log=lambda m: print(f"  [{algo} K={k}] {m}", flush=True))
            save(Path(out) / f"{algo}-k{k}", config, learner, seconds)
            res = evaluate(model, learner.params, learned_step_size(config, learner), k, 1, options.eval_tasks)
            rows.append({"algo": algo, **res, "train_seconds": round(seconds, 1), "config": asdict(config)})
            print(f"{algo:9s} K={k:2d}: MSE {res['mse']:.3f} ± {res['ci95']:.3f}  ({seconds:.0f}s)", flush=True)
            atomic_write_json(Path(out) / "results.json", rows)
    print("\n| method | " + " | ".join(f"{k}-shot (ours)" for k in shots) + " | "
          + " | ".join(f"{k}-shot (paper)" for k in shots) + " |")
    print("|---" * (1 + 2 * len(shots)) + "|")
    for algo in algos:
        ours = {r["shots"]: r for r in rows if r["algo"] == algo}
        paper = PAPER_TABLE.get(algo, {})
        cells = [f"{ours[k]['mse']:.2f} ± {ours[k]['ci95']:.2f}" if k in ours else "-" for k in shots]
        cells += [f"{paper[k][0]:.2f} ± {paper[k][1]:.2f}" if k in paper else "-" for k in shots]
        print(f"| {algo} | " + " | ".join(cells) + " |")
    tasks = rows[0]["tasks"] if rows else options.eval_tasks
    print(f"\ntotal training wall-clock {sum(r['train_seconds'] for r in rows):.0f}s; "
          f"{', '.join(map(str, iterations))} iterations per run, meta-batch 25, {tasks} test tasks x 100 query points")
