"""Gradient meta-RL on Meta-World: MAML, Meta-SGD or Reptile around a Gaussian MLP policy (MAML-RL).

One meta-iteration: draw a meta-batch of train tasks, play the policy (support episodes), adapt it per
task with policy-gradient step(s), play the adapted policies (query episodes; Reptile plays none: it learns
only from the support episodes its inner loop uses), meta-update (PPO's clipped surrogate through the inner
step, or Reptile's move), log, checkpoint. A run killed at any moment resumes from its last checkpoint and
rewrites the same log, and its budget.json the same counts; a finished run is extended by rerunning it with
a larger ``--iterations`` (the same run as one trained that long). A run of several processes resumes with
as many, all at the checkpoint's iteration.
Not for: evaluation (``rl_agent.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from gradient_meta.checkpoint import save_checkpoint
from gradient_meta.config import ALGOS, MODEL_TYPE, MetaRLConfig
from gradient_meta.functional import local_tasks
from gradient_meta.maml import MAML, MAMLConfig
from gradient_meta.meta_sgd import MetaSGD, init_step_sizes
from gradient_meta.policy import PolicyConfig, init_policy
from gradient_meta.reptile import Reptile, ReptileConfig
from gradient_meta.rl import (
    ObsNorm,
    Sampler,
    advantages,
    batch_moments,
    inner_loss,
    make_imitation_loss,
    make_outer_loss,
    to_batch,
)
from icl_metarl.harness.budget import Budget, write_budget
from icl_metarl.harness.checkpoint import load_optimizer, load_tensors, optimizer_tensors, save_tensors
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import as_json, atomic_write_text, read_log, trim_log
from icl_metarl.harness.settings import add_arguments, from_args
from icl_metarl.harness.suites import TaskSpec, get_suite, parse_goal_offsets, parse_task_pool, sample_new_tasks

STATE, LOG = "state.safetensors", "log.jsonl"
#: the optimizer's tensors in a state file: optim.<param index>.<name>
OPTIM = "optim."
#: every checkpoint's policy also stays in SNAPSHOTS/iteration-NNNNNN (a loadable checkpoint with its budget)
SNAPSHOTS = "snapshots"
#: fault injection for the resume test: SIGKILL this process right after logging this iteration
KILL_ENV = "ICL_METARL_KILL_AFTER_ITERATION"


# ---------------------------------------------------------------------------------- task pools
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
    return sample_new_tasks(suite.train_envs, pool, _seed(cfg.seed, 1), exclude=suite.training_exclusions(cfg.suite_seed))


def draw_tasks(cfg: MetaRLConfig, pool: list[TaskSpec] | None, iteration: int) -> list[TaskSpec]:
    """The meta-batch of an iteration: a function of (seed, iteration) only, so a resumed run draws the same."""
    if pool is None:
        suite = get_suite(cfg.suite)
        return sample_new_tasks(suite.train_envs, cfg.meta_batch, _seed(cfg.seed, 2, iteration),
                                exclude=suite.training_exclusions(cfg.suite_seed))
    rng = np.random.default_rng(_seed(cfg.seed, 3, iteration))
    idx = rng.choice(len(pool), cfg.meta_batch, replace=len(pool) < cfg.meta_batch)
    # Grouping by environment lets the sampler reuse its environments across meta-batches.
    return sorted((pool[i] for i in idx), key=lambda t: t.env_name)


# ---------------------------------------------------------------------------------- learners
def outer_loss(cfg: MetaRLConfig):
    """MAML's and Meta-SGD's outer loss: PPO on reward, or imitating the expert (``cfg.outer_loss``)."""
    return make_imitation_loss() if cfg.outer_loss == "imitate" else make_outer_loss(cfg.clip, cfg.entropy_coef)


def _maml(cfg: MetaRLConfig, params, accelerator):
    return MAML(params, inner_loss, outer_loss(cfg), _maml_config(cfg), accelerator)


def _meta_sgd(cfg: MetaRLConfig, params, accelerator):
    return MetaSGD(params, inner_loss, outer_loss(cfg), _maml_config(cfg), accelerator,
                   init_step_sizes(params, cfg.inner_lr))


def _reptile(cfg: MetaRLConfig, params, accelerator):
    # inner SGD as at test time (rl_agent adapts with plain SGD steps); Adam on theta - mean(phi)
    return Reptile(params, inner_loss, ReptileConfig(cfg.inner_steps, cfg.inner_lr, "sgd", cfg.meta_lr, "adam"),
                   accelerator)


def _maml_config(cfg: MetaRLConfig) -> MAMLConfig:
    return MAMLConfig(cfg.inner_steps, cfg.inner_lr, cfg.first_order, cfg.meta_lr, epochs=cfg.ppo_epochs)


#: algorithm name -> builder of its meta-learner (all share MAML's interface: update, adapt, step_size)
BUILDERS = {"maml": _maml, "meta-sgd": _meta_sgd, "reptile": _reptile}
assert set(BUILDERS) == set(ALGOS)


def build_learner(cfg: MetaRLConfig, params, accelerator=None):
    """The meta-learner of ``cfg.algo`` around initial policy parameters."""
    return BUILDERS[cfg.algo](cfg.resolved(), params, accelerator)


# ----------------------------------------------------------------------------------- state files
def save_state(out: Path, cfg: MetaRLConfig, learner, norm: ObsNorm, generator: torch.Generator,
               iteration: int, env_steps: int, rank: int = 0, budget: Budget | None = None,
               num_processes: int = 1) -> None:
    """Everything a resume needs in ONE file, written atomically: a kill leaves the old or the new state."""
    tensors = {f"params.{k}": v for k, v in learner.params.items()}
    tensors.update({f"step_size.{k}": v for k, v in (learner.step_sizes or {}).items()})
    tensors.update({f"obs_norm.{k}": v for k, v in norm.state().items()})
    tensors["rng"] = generator.get_state()
    opt_tensors, opt_meta = optimizer_tensors(learner.optimizer, OPTIM)
    tensors.update(opt_tensors)
    meta = {"iteration": str(iteration), "env_steps": str(env_steps), "config": json.dumps(asdict(cfg)),
            "optimizer": json.dumps(opt_meta), "num_processes": str(num_processes),
            **({"budget": json.dumps(budget.to_json())} if budget else {})}
    save_tensors(state_path(out, rank), tensors, meta)


def state_path(out: Path, rank: int) -> Path:
    """Process ``rank``'s resumable state: its generator and, on every rank, the learner's."""
    return out / (STATE if rank == 0 else f"state-rank{rank}.safetensors")


def written_by(out: Path, meta: dict) -> int:
    """How many processes wrote the run in ``out`` (states before that was recorded: one per rank file)."""
    if "num_processes" in meta:
        return int(meta["num_processes"])
    return 1 + sum(1 for _ in out.glob("state-rank*.safetensors"))


def check_resume(out: Path, ranks: list[tuple[int, int] | None], num_processes: int) -> int | None:
    """The iteration every process resumes from (None: a new run), given each rank's (iteration, processes
    that wrote it), or None where that rank has no state; a one-line UsageError where they cannot resume
    together: another number of processes would split the meta-batch and draw the episodes otherwise, and
    ranks at different iterations would run different loops."""
    held = {r: s for r, s in enumerate(ranks) if s is not None}
    if not held:
        return None
    writers = sorted({n for _, n in held.values()})
    if writers != [num_processes]:
        n = " and ".join(map(str, writers))
        raise UsageError(f"{str(out)!r} was written by {n} process(es), this run has {num_processes}; resume it with "
                         f"as many (accelerate launch --num_processes {writers[-1]}) or use a new --out")
    missing = [r for r in range(num_processes) if r not in held]
    if missing:
        raise UsageError(f"{str(out)!r} has no state for rank(s) {', '.join(map(str, missing))} of the "
                         f"{num_processes} processes that wrote it ({state_path(out, missing[0]).name}); "
                         f"use a new --out")
    iterations = {it for it, _ in held.values()}
    if len(iterations) > 1:
        at = ", ".join(f"rank {r} at {it}" for r, (it, _) in held.items())
        raise UsageError(f"the processes' states in {str(out)!r} hold different iterations ({at}), as when a kill "
                         f"fell between their writes; they cannot resume together: use a new --out")
    return iterations.pop()


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state file's tensors and metadata (``save_state``'s strings); a damaged one is a one-line UsageError."""
    return load_tensors(path, "training state")


def _gather_ranks(held: tuple[int, int] | None, accelerator=None) -> list[tuple[int, int] | None]:
    """Every process's (iteration, processes that wrote it) or None, in rank order."""
    if accelerator is None:
        return [held]
    mine = torch.tensor(held if held is not None else (-1, -1), dtype=torch.int64)
    return [None if it < 0 else (it, n) for it, n in accelerator.gather(mine).reshape(-1, 2).tolist()]


def save_policy(out: Path, cfg: MetaRLConfig, learner, norm: ObsNorm, iteration: int) -> None:
    """The checkpoint an agent loads: weights, step sizes and observation statistics, plus config.json."""
    save_checkpoint(out, learner.params, learner.step_sizes, {"model_type": MODEL_TYPE, "iteration": iteration,
                                                              "config": asdict(cfg)},
                    extra={f"obs_norm.{k}": v for k, v in norm.state().items()})


# ------------------------------------------------------------------------------------- the loop
def meta_train(cfg: MetaRLConfig, out: str | Path, accelerator=None, progress: bool = True) -> list[dict]:
    """Meta-train (or resume) into ``out``; returns the log, one dict per iteration."""
    out, cfg = Path(out), cfg.resolved()
    cpu0, wall0 = time.process_time(), time.perf_counter()  # this piece of the run's cost, for its budget
    nproc = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    share = local_tasks(cfg.meta_batch, nproc, rank)
    reduce_acc = accelerator if nproc > 1 else None

    torch.manual_seed(cfg.seed)
    params = init_policy(PolicyConfig(hidden=cfg.hidden, init_std=cfg.init_std), torch.Generator().manual_seed(cfg.seed))
    learner = build_learner(cfg, params, reduce_acc)
    norm = ObsNorm()
    generator = torch.Generator().manual_seed(_seed(cfg.seed, 4, rank))
    start, env_steps, log = 0, 0, []
    # This process's optimizer steps, CPU and wall time; its tasks and episodes come from the run's seed.
    spent, counted = Budget(seeds={"train": [cfg.seed], "data": [cfg.seed]}), True

    state_file = state_path(out, rank)
    tensors, meta = load_state(state_file) if state_file.exists() else (None, None)
    held = None if meta is None else (int(meta["iteration"]), written_by(out, meta))
    # every process judges every rank's state alike, so that all raise together or none does
    if check_resume(out, _gather_ranks(held, reduce_acc), nproc) is not None:
        # Compared as JSON has them (tuples read back as lists); a setting added since: its default.
        now, defaults = as_json(asdict(cfg)), as_json(asdict(MetaRLConfig()))
        saved = {**{k: defaults[k] for k in now if k in defaults}, **json.loads(meta["config"])}
        diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        # Only the iteration count may differ: nothing but the loop's end depends on it (each iteration's
        # tasks are a function of (seed, iteration)), so a finished run extended equals a longer run.
        if diff == ["iterations"] and cfg.iterations <= int(meta["iteration"]):
            raise UsageError(f"--iterations {cfg.iterations}: {str(out)!r} is already at iteration "
                             f"{meta['iteration']}; to extend it give more")
        if diff and diff != ["iterations"]:
            raise UsageError(f"{str(out)!r} holds a run with other settings ({', '.join(diff)}); "
                             f"use a new --out or the same settings to resume (--iterations may grow: extend)")
        with torch.no_grad():
            for k, p in learner.params.items():
                p.copy_(tensors[f"params.{k}"])
            for k, p in (learner.step_sizes or {}).items():
                p.copy_(tensors[f"step_size.{k}"])
        load_optimizer(learner.optimizer, tensors, json.loads(meta["optimizer"])["param_groups"], OPTIM)
        norm = ObsNorm.from_state({k: tensors[f"obs_norm.{k}"] for k in ("mean", "var", "count")})
        generator.set_state(tensors["rng"])
        start, env_steps = int(meta["iteration"]), int(meta["env_steps"])
        if "budget" in meta:
            spent = Budget.from_json(json.loads(meta["budget"]))
        else:
            counted = False
            warnings.warn(f"{state_file} predates budget accounting: its optimizer steps are unknown, so this "
                          f"run writes no budget.json", stacklevel=2)
        # Iterations logged after the checkpoint are redone, so their lines are dropped.
        log = [r for r in read_log(out / LOG) if r["iteration"] <= start]
        if rank == 0:
            trim_log(out / LOG, start, key="iteration")
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / LOG, "")

    def count_update(*_):  # every optimizer.step of any learner, however many it takes per iteration
        spent.optimizer_steps += 1

    learner.optimizer.register_step_post_hook(count_update)
    pool = build_pool(cfg)
    kill_after = int(os.environ.get(KILL_ENV, "0"))
    sampler = None
    bar = tqdm(range(start + 1, cfg.iterations + 1), initial=start, total=cfg.iterations,
               desc=f"meta-train {cfg.algo}", disable=not progress or rank != 0, dynamic_ncols=True)
    imitate = cfg.outer_loss == "imitate"  # the expert labels the adapted policy's states, not the support's
    goal_offsets = parse_goal_offsets(cfg.expert_goal_offsets)  # the labelling expert's corrections
    for it in bar:
        # 1. sample: pre-adaptation episodes, inner step(s), post-adaptation episodes (not Reptile's)
        t0 = time.perf_counter()
        tasks = draw_tasks(cfg, pool, it)[share]
        if sampler is None:
            sampler = Sampler(tasks, cfg.episode_length, seed=_seed(cfg.seed, 5, rank) % 2**31,
                              action_repeat=cfg.action_repeat)
        sampler.set_tasks(tasks)
        params = {k: v.detach() for k, v in learner.params.items()}
        pre = sampler.sample(params, norm, cfg.adapt_episodes, generator, per_task=False)
        support = to_batch(pre, advantages(pre, cfg.gamma, cfg.gae_lambda))
        post, query, t_adapt = None, None, 0.0
        if cfg.query_episodes:  # none for Reptile: it learns only from the support episodes its inner loop uses
            t_adapt = time.perf_counter()
            adapted = learner.adapt(support)
            t_adapt = time.perf_counter() - t_adapt
            post = sampler.sample(adapted, norm, cfg.query_episodes, generator, per_task=True, label_expert=imitate,
                                  goal_offsets=goal_offsets)
            query = to_batch(post, advantages(post, cfg.gamma, cfg.gae_lambda))
        sample_s = time.perf_counter() - t0 - t_adapt
        played = [pre] if post is None else [pre, post]

        # 2. learn: meta-gradient steps through the inner step (PPO epochs), or Reptile's move
        t1 = time.perf_counter()
        loss = learner.update(support, query)
        learn_s = time.perf_counter() - t1 + t_adapt

        # 3. observation statistics, from every process, for the next iteration
        raw = torch.cat([b.raw_obs.reshape(-1, b.raw_obs.shape[-1]) for b in played])
        n, mean, var = batch_moments(raw)
        if reduce_acc is not None:  # equal shares: the mean of the moments is the moment of the union
            mean_all = reduce_acc.reduce(mean, reduction="mean")
            var = reduce_acc.reduce(var + (mean - mean_all) ** 2, reduction="mean")
            mean, n = mean_all, n * nproc
        norm.update(n, mean, var)
        # what was played, and nothing else: simulator steps; the expert labelled each decision of the query episodes
        env_steps += sum(b.simulator_steps(cfg.episode_length) for b in played) * nproc
        spent.expert_labels += post.steps * nproc if imitate else 0

        # 4. log (after the inner step: only where query episodes were played)
        named = {"success_pre": pre.success[:, 0].mean(), "return_pre": pre.rew.sum(-1)[:, 0].mean()}
        if post is not None:
            named |= {"success_post": post.success[:, -1].mean(), "return_post": post.rew.sum(-1)[:, -1].mean()}
        stats = torch.stack([*named.values(), torch.tensor(loss)])
        if reduce_acc is not None:
            stats = reduce_acc.reduce(stats.contiguous(), reduction="mean")
        row = {"iteration": it, "env_steps": env_steps,
               **{k: round(float(v), 4 if k.startswith("success") else 3) for k, v in zip(named, stats)},
               "loss": float(stats[-1]), "sample_s": round(sample_s, 3), "learn_s": round(learn_s, 3)}
        if learner.step_sizes is not None:
            row["mean_step_size"] = float(torch.cat([v.detach().flatten() for v in learner.step_sizes.values()]).mean())
        log.append(row)
        if rank == 0:
            with open(out / LOG, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(pre=f"{row['success_pre']:.2f}",
                            **({"post": f"{row['success_post']:.2f}"} if post is not None else {}))

        # 5. checkpoint
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            mine = replace(spent, env_steps=env_steps,
                           train_cpu_minutes=spent.train_cpu_minutes + (time.process_time() - cpu0) / 60,
                           wall_minutes=spent.wall_minutes + (time.perf_counter() - wall0) / 60)
            save_state(out, cfg, learner, norm, generator, it, env_steps, rank, mine if counted else None, nproc)
            cpu = reduce_acc.reduce(torch.tensor(mine.train_cpu_minutes), reduction="sum") if reduce_acc else None
            if rank == 0:
                total = mine if cpu is None else replace(mine, train_cpu_minutes=float(cpu))
                # the checkpoint, and a snapshot of it that stays: budget curves evaluate every snapshot
                for where in (out, out / SNAPSHOTS / f"iteration-{it:06d}"):
                    save_policy(where, cfg, learner, norm, it)
                    if counted:
                        write_budget(where, total)
        if kill_after and it == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if sampler is not None:
        sampler.close()
    return log


def train_checkpoint(cfg: MetaRLConfig, out) -> list[dict]:
    """Meta-train (or resume) into ``out``, the learner registry's entry point; under ``accelerate
    launch`` with several processes they split the meta-batch."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available()) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    log = meta_train(cfg, out, accelerator)
    if log and (accelerator is None or accelerator.is_main_process):
        last = log[-1]
        after = f", after {last['success_post']:.2f}" if "success_post" in last else ""
        print(f"iteration {last['iteration']}: meta-train success before adaptation {last['success_pre']:.2f}"
              f"{after}; checkpoint in {out}")
    return log


def main(argv: list[str] | None = None) -> int:
    """``accelerate launch -m gradient_meta.meta_rl --out DIR ...`` (``icl-metarl train maml`` otherwise)."""
    parser = argparse.ArgumentParser(prog="gradient_meta.meta_rl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, MetaRLConfig)
    parser.add_argument("--out", required=True, help="run directory; rerun the same command to resume it")
    args = parser.parse_args(argv)
    try:
        train_checkpoint(from_args(MetaRLConfig, args), args.out)
    except UsageError as e:
        print(f"gradient_meta.meta_rl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
