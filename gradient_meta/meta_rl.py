"""Gradient meta-RL on Meta-World: MAML, Meta-SGD or Reptile around a Gaussian MLP policy (MAML-RL).

One meta-iteration: draw a meta-batch of train tasks, play the policy (support episodes), adapt it per
task with policy-gradient step(s), play the adapted policies (query episodes), meta-update (PPO's clipped
surrogate through the inner step, or Reptile's move), log, checkpoint. A run killed at any moment
resumes from its last checkpoint and rewrites the same log. Not for: evaluation (``rl_agent.py``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gradient_meta.functional import adapt_tasks, check_inner_steps, check_step_size, local_tasks
from gradient_meta.policy import PolicyConfig, init_policy
from gradient_meta.rl import ObsNorm, Sampler, advantages, batch_moments, inner_loss, make_outer_loss, to_batch
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import atomic_write_bytes, atomic_write_json, atomic_write_text, versions
from icl_metarl.harness.suites import TaskSpec, check_episode_length, get_suite, sample_new_tasks

ALGOS = ("maml", "meta-sgd", "reptile")
MODEL_TYPE = "gradient_meta_rl"
STATE, WEIGHTS, CONFIG, LOG = "state.safetensors", "model.safetensors", "config.json", "log.jsonl"
#: fault injection for the resume test: SIGKILL this process right after logging this iteration
KILL_ENV = "ICL_METARL_KILL_AFTER_ITERATION"


@dataclass
class MetaRLConfig:
    """One gradient meta-RL run; CPU-friendly defaults except the benchmark's episode length."""

    algo: str = "maml"
    """maml (second order through the inner step), meta-sgd (also learns per-parameter step sizes), reptile."""
    suite: str = "ML1:reach-v3"
    """Meta-World suite; meta-training uses its train split (or new tasks of its train environments)."""
    task_pool: str = "benchmark"
    """benchmark (the split's train tasks), N (N distinct new train tasks, never a test task), fresh (new every draw)."""
    suite_seed: int = 0
    """Meta-World benchmark seed (which tasks are train and test)."""
    iterations: int = 200
    """Meta-iterations."""
    meta_batch: int = 10
    """Tasks per meta-iteration, split evenly among processes."""
    episode_length: int = 500
    """Steps per episode (the benchmark's 500; 100-150 for CPU runs)."""
    adapt_episodes: int = 1
    """Episodes played with the pre-adaptation policy per task; the inner step(s) learn from them."""
    query_episodes: int = 1
    """Episodes played with each adapted policy; the outer loss learns from them."""
    inner_steps: int = 1
    """Policy-gradient steps on the adaptation episodes (Reptile: its k)."""
    inner_lr: float = 0.1
    """Inner step size (Meta-SGD: the initial value of every learned step size)."""
    first_order: bool = False
    """Drop MAML's second-order terms (FOMAML)."""
    meta_lr: float = 1e-3
    """Adam learning rate of the meta-update (Reptile: Adam applied to theta - mean(phi))."""
    ppo_epochs: int = 5
    """Meta-gradient steps per meta-iteration on the same episodes (MAML, Meta-SGD)."""
    clip: float = 0.2
    """PPO clip range of the outer loss."""
    entropy_coef: float = 0.0
    """Entropy bonus in the outer loss."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    hidden: tuple[int, ...] = (64, 64)
    """Policy hidden widths."""
    init_std: float = 0.5
    """Initial action standard deviation."""
    seed: int = 0
    """Seeds weights, action noise and task draws."""
    checkpoint_every: int = 10
    """Write the resumable state every this many iterations (and at the end)."""

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise choice_error("algorithm", self.algo, ALGOS)
        get_suite(self.suite)
        parse_task_pool(self.task_pool)
        check_episode_length(self.episode_length)
        for what in ("iterations", "meta_batch", "adapt_episodes", "query_episodes", "ppo_epochs",
                     "checkpoint_every"):
            v = getattr(self, what)
            if not isinstance(v, int) or v < 1:
                raise UsageError(f"{what.replace('_', '-')} must be an integer >= 1, got {v!r}")
        check_inner_steps(self.inner_steps)
        check_step_size(self.inner_lr, "inner-lr")
        check_step_size(self.meta_lr, "meta-lr")
        check_step_size(self.clip, "clip")
        for what in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, what) <= 1.0:
                raise UsageError(f"{what.replace('_', '-')} must be in [0, 1], got {getattr(self, what)!r}")
        self.hidden = tuple(self.hidden)
        PolicyConfig(hidden=self.hidden, init_std=self.init_std)

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(hidden=self.hidden, init_std=self.init_std)


# ---------------------------------------------------------------------------------- task pools
def parse_task_pool(value) -> str | int:
    """'benchmark', 'fresh', or a positive count of new train tasks."""
    if value in ("benchmark", "fresh"):
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UsageError(f"task pool {value!r} is not valid; valid: benchmark, fresh, or a count N >= 1")
    return n


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def build_pool(cfg: MetaRLConfig) -> list[TaskSpec] | None:
    """The tasks meta-training draws from; None for 'fresh' (new tasks every meta-batch)."""
    suite = get_suite(cfg.suite)
    pool = parse_task_pool(cfg.task_pool)
    if pool == "benchmark":
        return suite.tasks("train", cfg.suite_seed)
    if pool == "fresh":
        return None
    return sample_new_tasks(suite.train_envs, pool, _seed(cfg.seed, 1), exclude=suite.tasks("test", cfg.suite_seed))


def draw_tasks(cfg: MetaRLConfig, pool: list[TaskSpec] | None, iteration: int) -> list[TaskSpec]:
    """The meta-batch of an iteration: a function of (seed, iteration) only, so a resumed run draws the same."""
    if pool is None:
        suite = get_suite(cfg.suite)
        return sample_new_tasks(suite.train_envs, cfg.meta_batch, _seed(cfg.seed, 2, iteration),
                                exclude=suite.tasks("test", cfg.suite_seed))
    rng = np.random.default_rng(_seed(cfg.seed, 3, iteration))
    idx = rng.choice(len(pool), cfg.meta_batch, replace=len(pool) < cfg.meta_batch)
    # Grouping by environment lets the sampler reuse its environments across meta-batches.
    return sorted((pool[i] for i in idx), key=lambda t: t.env_name)


# ---------------------------------------------------------------------------------- learners
def build_learner(cfg: MetaRLConfig, params, accelerator=None):
    """The meta-learner of ``cfg.algo`` around initial policy parameters."""
    from gradient_meta.maml import MAML, MAMLConfig
    from gradient_meta.meta_sgd import MetaSGD, init_step_sizes
    from gradient_meta.reptile import Reptile, ReptileConfig

    if cfg.algo == "reptile":
        return Reptile(params, inner_loss,
                       ReptileConfig(cfg.inner_steps, cfg.inner_lr, "sgd", cfg.meta_lr, "adam"), accelerator)
    mcfg = MAMLConfig(cfg.inner_steps, cfg.inner_lr, cfg.first_order, cfg.meta_lr)
    outer = make_outer_loss(cfg.clip, cfg.entropy_coef)
    if cfg.algo == "meta-sgd":
        return MetaSGD(params, inner_loss, outer, mcfg, accelerator, init_step_sizes(params, cfg.inner_lr))
    return MAML(params, inner_loss, outer, mcfg, accelerator)


def step_size_of(cfg: MetaRLConfig, learner):
    """The inner step size adaptation uses: Meta-SGD's learned tensors, else the configured scalar."""
    return getattr(learner, "step_sizes", None) or cfg.inner_lr


# ----------------------------------------------------------------------------------- state files
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict split into tensors (for safetensors) and JSON (the rest)."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = []
        for name, v in st.items():
            tensors[f"optim.{idx}.{name}"] = v.detach().clone().contiguous()
            meta["state"][str(idx)].append(name)
    return tensors, meta


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state = {int(idx): {name: tensors[f"optim.{idx}.{name}"] for name in names}
             for idx, names in meta["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(out: Path, cfg: MetaRLConfig, learner, norm: ObsNorm, generator: torch.Generator,
               iteration: int, env_steps: int, rank: int = 0) -> None:
    """Everything a resume needs in ONE file, written atomically: a kill leaves the old or the new state."""
    tensors = {f"params.{k}": v.detach().clone() for k, v in learner.params.items()}
    for k, v in (getattr(learner, "step_sizes", None) or {}).items():
        tensors[f"step_size.{k}"] = v.detach().clone()
    tensors.update({f"obs_norm.{k}": v for k, v in norm.state().items()})
    tensors["rng"] = generator.get_state()
    opt_tensors, opt_meta = _optimizer_tensors(learner.optimizer)
    tensors.update(opt_tensors)
    meta = {"iteration": str(iteration), "env_steps": str(env_steps), "config": json.dumps(asdict(cfg)),
            "optimizer": json.dumps(opt_meta)}
    atomic_write_bytes(out / (STATE if rank == 0 else f"state-rank{rank}.safetensors"), st_save(tensors, meta))


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        tensors = st_load(path.read_bytes())
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except Exception as e:  # safetensors raises its own error types
        raise UsageError(f"training state {str(path)!r} cannot be read: {e}") from None
    return tensors, meta


def save_policy(out: Path, cfg: MetaRLConfig, learner, norm: ObsNorm, iteration: int) -> None:
    """The checkpoint an agent loads: weights, step sizes and observation statistics, plus config.json."""
    tensors = {f"params.{k}": v.detach().clone().contiguous() for k, v in learner.params.items()}
    for k, v in (getattr(learner, "step_sizes", None) or {}).items():
        tensors[f"step_size.{k}"] = v.detach().clone().contiguous()
    tensors.update({f"obs_norm.{k}": v for k, v in norm.state().items()})
    atomic_write_bytes(out / WEIGHTS, st_save(tensors))
    atomic_write_json(out / CONFIG, {"model_type": MODEL_TYPE, "iteration": iteration, "config": asdict(cfg),
                                     "learned_step_sizes": cfg.algo == "meta-sgd", "versions": versions()})


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill ends the log
    return out


# ------------------------------------------------------------------------------------- the loop
def meta_train(cfg: MetaRLConfig, out: str | Path, accelerator=None, progress: bool = True) -> list[dict]:
    """Meta-train (or resume) into ``out``; returns the log, one dict per iteration."""
    from tqdm import tqdm

    out = Path(out)
    nproc = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    share = local_tasks(cfg.meta_batch, nproc, rank)
    reduce_acc = accelerator if nproc > 1 else None

    # The policy is small: one thread avoids thread-pool waits that cost more than the maths (rl.py).
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    params = init_policy(cfg.policy_config(), torch.Generator().manual_seed(cfg.seed))
    learner = build_learner(cfg, params, reduce_acc)
    norm = ObsNorm()
    generator = torch.Generator().manual_seed(_seed(cfg.seed, 4, rank))
    start, env_steps, log = 0, 0, []

    state_file = out / (STATE if rank == 0 else f"state-rank{rank}.safetensors")
    if state_file.exists():
        tensors, meta = load_state(state_file)
        saved = json.loads(meta["config"])
        saved["hidden"] = tuple(saved["hidden"])
        if saved != asdict(cfg):
            diff = sorted(k for k in saved if saved[k] != asdict(cfg).get(k))
            raise UsageError(f"{str(out)!r} holds a run with other settings ({', '.join(diff)}); "
                             f"use a new --out or the same settings to resume")
        with torch.no_grad():
            for k, p in learner.params.items():
                p.copy_(tensors[f"params.{k}"])
            for k, p in (getattr(learner, "step_sizes", None) or {}).items():
                p.copy_(tensors[f"step_size.{k}"])
        _load_optimizer(learner.optimizer, tensors, json.loads(meta["optimizer"]))
        norm = ObsNorm.from_state({k: tensors[f"obs_norm.{k}"] for k in ("mean", "var", "count")})
        generator.set_state(tensors["rng"])
        start, env_steps = int(meta["iteration"]), int(meta["env_steps"])
        # Iterations logged after the checkpoint are redone, so their lines are dropped.
        log = [r for r in _read_log(out / LOG) if r["iteration"] <= start]
        if rank == 0:
            atomic_write_text(out / LOG, "".join(json.dumps(r) + "\n" for r in log))
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / LOG, "")

    pool = build_pool(cfg)
    kill_after = int(os.environ.get(KILL_ENV, "0"))
    sampler = None
    bar = tqdm(range(start + 1, cfg.iterations + 1), initial=start, total=cfg.iterations,
               desc=f"meta-train {cfg.algo}", disable=not progress or rank != 0, dynamic_ncols=True)
    for it in bar:
        # 1. sample: pre-adaptation episodes, inner step(s), post-adaptation episodes
        t0 = time.perf_counter()
        tasks = draw_tasks(cfg, pool, it)[share]
        if sampler is None:
            sampler = Sampler(tasks, cfg.episode_length, seed=_seed(cfg.seed, 5, rank) % 2**31)
        sampler.set_tasks(tasks)
        params = {k: v.detach() for k, v in learner.params.items()}
        pre = sampler.sample(params, norm, cfg.adapt_episodes, generator, per_task=False)
        support = to_batch(pre, advantages(pre, cfg.gamma, cfg.gae_lambda))
        t_adapt = time.perf_counter()
        adapted = adapt_tasks(inner_loss, params, support, step_size_of(cfg, learner), cfg.inner_steps)
        t_adapt = time.perf_counter() - t_adapt
        post = sampler.sample(adapted, norm, cfg.query_episodes, generator, per_task=True)
        query = to_batch(post, advantages(post, cfg.gamma, cfg.gae_lambda))
        sample_s = time.perf_counter() - t0 - t_adapt

        # 2. learn: meta-gradient steps through the inner step (PPO epochs), or Reptile's move
        t1 = time.perf_counter()
        if cfg.algo == "reptile":
            loss = learner.step(support)
        else:
            for _ in range(cfg.ppo_epochs):
                loss = learner.step(support, query)
        learn_s = time.perf_counter() - t1 + t_adapt

        # 3. observation statistics, from every process, for the next iteration
        raw = torch.cat([pre.raw_obs.reshape(-1, pre.raw_obs.shape[-1]), post.raw_obs.reshape(-1, pre.raw_obs.shape[-1])])
        n, mean, var = batch_moments(raw)
        if reduce_acc is not None:  # equal shares: the mean of the moments is the moment of the union
            mean_all = reduce_acc.reduce(mean, reduction="mean")
            var = reduce_acc.reduce(var + (mean - mean_all) ** 2, reduction="mean")
            mean, n = mean_all, n * nproc
        norm.update(n, mean, var)
        env_steps += (pre.steps + post.steps) * nproc

        # 4. log
        stats = torch.stack([pre.success[:, 0].mean(), post.success[:, -1].mean(),
                             pre.rew.sum(-1)[:, 0].mean(), post.rew.sum(-1)[:, -1].mean(), torch.tensor(loss)])
        if reduce_acc is not None:
            stats = reduce_acc.reduce(stats.contiguous(), reduction="mean")
        row = {"iteration": it, "env_steps": env_steps, "success_pre": round(float(stats[0]), 4),
               "success_post": round(float(stats[1]), 4), "return_pre": round(float(stats[2]), 3),
               "return_post": round(float(stats[3]), 3), "loss": float(stats[4]),
               "sample_s": round(sample_s, 3), "learn_s": round(learn_s, 3)}
        if cfg.algo == "meta-sgd":
            row["mean_step_size"] = float(torch.cat([v.detach().flatten() for v in learner.step_sizes.values()]).mean())
        log.append(row)
        if rank == 0:
            with open(out / LOG, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(pre=f"{row['success_pre']:.2f}", post=f"{row['success_post']:.2f}")

        # 5. checkpoint
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            save_state(out, cfg, learner, norm, generator, it, env_steps, rank)
            if rank == 0:
                save_policy(out, cfg, learner, norm, it)
        if kill_after and it == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if sampler is not None:
        sampler.close()
    return log


def config_from_options(options: dict) -> MetaRLConfig:
    """A config from command-line options (names as the dataclass fields; unknown ones are an error)."""
    known = {f.name: f for f in fields(MetaRLConfig)}
    for k in options:
        if k not in known:
            raise choice_error("meta-train option", k, known)
    return MetaRLConfig(**options)


# ---------------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """``--<field>`` for every MetaRLConfig field (defaults and help from the dataclass), ``--out``."""
    from icl_metarl.harness.settings import field_docs

    docs = field_docs(MetaRLConfig)
    for f in fields(MetaRLConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default {f.default if f.name != 'hidden' else '64,64'})".replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=f.default, help=help_)
        elif f.name == "hidden":
            parser.add_argument(flag, default="64,64", help=help_ + "; comma-separated widths")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_)
    parser.add_argument("--out", required=True, help="run directory; rerun the same command to resume it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args) -> None:
    """The ``icl-metarl meta-train`` command (also ``accelerate launch -m gradient_meta.meta_rl``)."""
    options = {f.name: getattr(args, f.name) for f in fields(MetaRLConfig)}
    try:
        options["hidden"] = tuple(int(h) for h in str(options["hidden"]).split(","))
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated integers, got {options['hidden']!r}") from None
    cfg = config_from_options(options)
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate with several processes
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    log = meta_train(cfg, args.out, accelerator, progress=not args.no_progress)
    if log and (accelerator is None or accelerator.is_main_process):
        last = log[-1]
        print(f"iteration {last['iteration']}: meta-train success before adaptation {last['success_pre']:.2f}, "
              f"after {last['success_post']:.2f}; checkpoint in {args.out}")


if __name__ == "__main__":
    import argparse
    import sys

    _parser = argparse.ArgumentParser(prog="gradient_meta.meta_rl", description="gradient meta-RL on Meta-World")
    add_arguments(_parser)
    try:
        run_from_args(_parser.parse_args())
    except UsageError as e:
        print(f"meta-train: error: {e}", file=sys.stderr)
        sys.exit(2)
