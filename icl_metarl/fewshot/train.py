"""Train every learner of a few-shot study on one task family: the in-context regressor here (resumable),
the gradient learners through ``gradient_meta.sinusoid`` (MAML, Meta-SGD, Reptile, pretrain).

A run directory holds ``fewshot_run.json`` and one checkpoint directory per learner (``icl/``, ``maml/``,
...). The regressor's resumable state (``icl/checkpoints/step-*``: weights, AdamW moments and the task
generator's state, all safetensors, plus a JSON) is written atomically; nothing is pickled. Not for:
scoring (``evaluation.py``) or probing (``probe.py``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradient_meta import sinusoid
from gradient_meta.config import SinusoidConfig
from icl_metarl.fewshot.config import RUN_FILE, FewShotTrainConfig
from icl_metarl.fewshot.model import ICLRegressor, ICLRegressorConfig
from icl_metarl.harness import checkpoint
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import as_json, atomic_write_json, read_json, trim_log, versions
from icl_metarl.harness.regression_tasks import Family, get_family

STATE_NAME = "trainer_state.json"
KEEP_CHECKPOINTS = 2
#: the optimizer's tensors in optimizer.safetensors: state.<param index>.<name>
OPTIM = "state."
#: settings that may differ between the command that started a run and the one that finishes it
_MAY_DIFFER = ("learners", "resume", "threads")


# ----------------------------------------------------------------------------------- checkpoints
def complete_checkpoints(run: Path) -> list[Path]:
    """Fully written checkpoints of the regressor, oldest first (a temporary one never counts)."""
    return checkpoint.complete_checkpoints(run / "checkpoints", STATE_NAME)


def save_state(run: Path, step: int, model: ICLRegressor, optimizer, generator: torch.Generator,
               cpu_seconds: float) -> None:
    """Weights, optimizer moments and the task generator after ``step`` steps, in one atomic directory."""
    opt_tensors, opt_meta = checkpoint.optimizer_tensors(optimizer, OPTIM)
    with checkpoint.atomic_directory(checkpoint.step_dir(run / "checkpoints", step)) as tmp:
        checkpoint.save_tensors(tmp / "model.safetensors", model.state_dict())
        checkpoint.save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, "generator": generator.get_state()})
        atomic_write_json(tmp / STATE_NAME, {"step": step, "param_groups": opt_meta["param_groups"],
                                             "cpu_seconds": cpu_seconds})
    checkpoint.keep_last(run / "checkpoints", STATE_NAME, KEEP_CHECKPOINTS)


def load_state(path: Path, model: ICLRegressor, optimizer, generator: torch.Generator) -> dict:
    """Restore what ``save_state`` wrote; returns its trainer_state.json."""
    state = checkpoint.load_json(path / STATE_NAME, "regressor checkpoint")
    weights, _ = checkpoint.load_tensors(path / "model.safetensors", "regressor checkpoint")
    model.load_state_dict(weights)
    tensors, _ = checkpoint.load_tensors(path / "optimizer.safetensors", "regressor checkpoint")
    generator.set_state(tensors["generator"])
    checkpoint.load_optimizer(optimizer, tensors, state["param_groups"], OPTIM)
    return state


# -------------------------------------------------------------------------------------- training
def regressor_config(config: FewShotTrainConfig, family: Family) -> ICLRegressorConfig:
    return ICLRegressorConfig(x_dim=family.x_dim, d_model=config.d_model, n_layer=config.n_layer,
                              n_head=config.n_head, max_shots=config.max_shots, family=family.name)


def sample_batch(family: Family, batch: int, max_shots: int, queries: int, generator: torch.Generator):
    """One training batch: support (B, K, .), queries (B, M, .) and each query's number of shots (B, M)."""
    tasks = family.sample_tasks(batch, generator)
    sx, sy = family.sample_points(tasks, max_shots, generator)
    qx, qy = family.sample_points(tasks, queries, generator)
    shots = torch.randint(1, max_shots + 1, (batch, queries), generator=generator)
    return sx, sy, qx, qy, shots


def train_regressor(config: FewShotTrainConfig, run: str | Path, log=print) -> ICLRegressor:
    """Pretrain (or resume) the in-context regressor on ``config.family``; writes ``run`` and returns the model."""
    run = Path(run)
    family = get_family(config.family)
    checkpoints = complete_checkpoints(run)
    if checkpoints and not config.resume:
        raise UsageError(f"{run} already holds checkpoints; pass --resume to continue it, or choose another --out")
    torch.manual_seed(config.seed)
    model = ICLRegressor(regressor_config(config, family)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.icl_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(20_000 + config.seed)
    start, cpu_before = 0, 0.0
    if checkpoints:
        state = load_state(checkpoints[-1], model, optimizer, generator)
        start, cpu_before = state["step"], state["cpu_seconds"]
        log(f"icl: resuming from {checkpoints[-1]}")
    run.mkdir(parents=True, exist_ok=True)
    log_file = run / "log.jsonl"
    trim_log(log_file, start)
    warmup = max(1, config.icl_steps // 20)
    cpu0, running, since = time.process_time(), 0.0, 0
    for step in range(start, config.icl_steps):
        # sample
        sx, sy, qx, qy, shots = sample_batch(family, config.icl_batch, config.max_shots, config.icl_queries, generator)
        # compute
        loss = F.mse_loss(model(sx, sy, qx, shots).prediction, qy[..., 0])
        # update: linear warm-up, then constant
        for group in optimizer.param_groups:
            group["lr"] = config.icl_lr * min(1.0, (step + 1) / warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running, since, done = running + float(loss.detach()), since + 1, step + 1
        # log
        if done % max(1, config.icl_steps // 10) == 0 or done == config.icl_steps:
            with open(log_file, "a") as f:
                f.write(json.dumps({"step": done, "loss": running / since}) + "\n")
            log(f"icl step {done}: query MSE {running / since:.3f}")
            running, since = 0.0, 0
        # checkpoint
        if done % config.checkpoint_every == 0 or done == config.icl_steps:
            save_state(run, done, model, optimizer, generator, cpu_before + time.process_time() - cpu0)
    model.eval().save_pretrained(run)
    cpu = cpu_before + time.process_time() - cpu0
    atomic_write_json(run / "training.json", {"family": family.name, "optimizer_steps": config.icl_steps,
                                              "tasks_seen": config.icl_steps * config.icl_batch,
                                              "cpu_seconds": round(cpu, 1), "versions": versions()})
    return model


def gradient_config(config: FewShotTrainConfig, algo: str) -> SinusoidConfig:
    """``gradient_meta.sinusoid``'s settings for one gradient learner of the study: the regressor's shot range
    1..max_shots, so that neither is scored on shot counts only the other trained on."""
    reptile = algo == "reptile"
    return SinusoidConfig(algo=algo, family=config.family, shots=config.max_shots, min_shots=1,
                          iterations=config.iterations, meta_batch=config.meta_batch,
                          inner_steps=config.reptile_inner_steps if reptile else config.inner_steps,
                          inner_lr=config.inner_lr, meta_lr=config.reptile_epsilon if reptile else config.meta_lr,
                          seed=config.seed, log_every=max(1, config.iterations // 4), threads=config.threads)


def _check_run(out: Path, config: FewShotTrainConfig) -> None:
    """A run directory is finished by the command that started it (learners, --resume, threads aside)."""
    if not (out / RUN_FILE).is_file():
        return
    before = read_json(out / RUN_FILE)["config"]
    now = dataclasses.asdict(config)
    differ = [k for k in now if k not in _MAY_DIFFER and as_json(now[k]) != before.get(k)]
    if differ:
        raise UsageError(f"{out} was started with other settings ({', '.join(differ)}); use another --out")


def train_command(config: FewShotTrainConfig, out) -> None:
    """``icl-metarl fewshot train``: every requested learner, each skipped when already finished."""
    out = Path(out)
    family = get_family(config.family)
    _check_run(out, config)
    atomic_write_json(out / RUN_FILE, {"family": family.name, "config": dataclasses.asdict(config),
                                       "versions": versions()})
    for name in config.learners:
        target = out / name
        if (target / "config.json").is_file():
            print(f"{name}: already trained in {target}; delete it to train again")
            continue
        if name == "icl":
            train_regressor(config, target)
            continue
        cfg = gradient_config(config, name)
        model, learner, seconds = sinusoid.train(cfg, log=lambda m, n=name: print(f"{n} {m}"))
        sinusoid.save(target, cfg, learner, seconds)
        print(f"{name}: {cfg.iterations} meta-updates in {seconds:.0f}s -> {target}")
    print(f"wrote {out}; next: icl-metarl fewshot evaluate {out} --out <dir>")
