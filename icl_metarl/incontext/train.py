"""Pretraining of the in-context policy: one loop for one CPU, several processes, GPUs and nodes.

    icl-metarl train icl --data data/reach --out runs/icl-reach                                # one process
    accelerate launch --num_processes 2 -m icl_metarl.study.cli train icl --data ... --out ...  # data parallel

The loop reads top to bottom: batch, loss, backward, step, log, checkpoint. Every process takes its
own share of each global batch (disjoint windows), so N processes with batch b equal one with N*b.
Checkpoints are accelerate ``save_state`` directories (its optimizer, scheduler and RNG states) written
under a temporary name and renamed by ``icl_metarl.harness.checkpoint``.
Not for: data generation (histories.py) or evaluation (evaluation.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, set_seed
from tqdm.auto import tqdm

from icl_metarl.harness import checkpoint
from icl_metarl.harness.budget import Budget, round_phase, run_budget, write_budget
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_bytes, atomic_write_json, trim_log, versions
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import check_playable, decisions_per_episode, get_suite
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.config import GenerateConfig, TrainConfig, check_train
from icl_metarl.incontext.histories import generate
from icl_metarl.incontext.loss import window_loss
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig, write_policy_config
from icl_metarl.incontext.shards import load_histories
from icl_metarl.incontext.windows import WindowDataset, WindowSampler, collate

STATE_NAME = "trainer_state.json"


# -------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------- checkpoints
def complete_checkpoints(run: Path) -> list[Path]:
    """Checkpoint directories that were fully written, oldest first (a temporary one never counts)."""
    return checkpoint.complete_checkpoints(run / "checkpoints", STATE_NAME)


def save_checkpoint(accelerator, run: Path, step: int, keep: int, budget: Budget | None = None,
                    model_config: ICLPolicyConfig | None = None, agent_budget: Budget | None = None) -> None:
    """accelerate ``save_state`` (every process's part) into a temporary directory, then the main process
    alone makes it complete with one rename; the run's ``budget`` so far rides in its trainer_state.json,
    so a resume restores it.

    With ``model_config`` the directory is also an agent checkpoint (its config.json beside accelerate's
    model.safetensors, and ``agent_budget``, the data's cost plus training so far, as budget.json), so
    ``icl-metarl evaluate RUN/checkpoints/step-N`` plays the step: choosing the step on validation.
    """
    root = run / "checkpoints"
    final = checkpoint.step_dir(root, step)
    tmp = checkpoint.temporary_sibling(final)
    checkpoint.write_on_main(accelerator, lambda: checkpoint.fresh_directory(tmp))
    accelerator.save_state(str(tmp), safe_serialization=True)

    def publish():
        atomic_write_json(tmp / STATE_NAME, {"step": step, **({"budget": budget.to_json()} if budget else {})})
        if model_config is not None:
            write_policy_config(model_config, tmp)
        if agent_budget is not None:
            write_budget(tmp, agent_budget)
        checkpoint.publish(tmp, final)
        checkpoint.keep_last(root, STATE_NAME, keep)

    checkpoint.write_on_main(accelerator, publish)


# ------------------------------------------------------------------------------------------ data
class WindowStream:
    """The global, seeded stream of training windows; a step's batch is a slice of it.

    Position p of the stream is the same window on every process, so process r of N taking
    positions [first + r*b, first + (r+1)*b) makes N processes of batch b equal one of batch N*b.
    """

    def __init__(self, dirs, episodes_per_window: int, seed: int, from_trial_start: bool = False):

        self.dataset = WindowDataset(dirs, episodes_per_window, from_trial_start=from_trial_start)
        self.sampler = WindowSampler(len(self.dataset), seed=seed)
        manifest = self.dataset.sources[0].manifest
        self.episode_length = self.dataset.episode_length  # decisions (tokens) per episode
        self.action_repeat = self.dataset.action_repeat
        self.simulator_episode_length = self.dataset.simulator_episode_length
        self.obs_dim, self.act_dim = int(manifest["obs_dim"]), int(manifest["act_dim"])
        self.suite = manifest["settings"]["suite"]

    def batch(self, positions: range) -> dict:

        return collate([self.dataset[self.sampler.window_at(p)] for p in positions])  # (B, W, ...)

    def mean_action_mse(self, target: str, windows: int = 256) -> float:
        """MSE of predicting the data's mean action for every step: the loss a model must beat."""

        key = "expert_actions" if target == "expert" else "actions"
        acts = self.batch(range(min(windows, len(self.dataset))))[key].flatten(0, 1)  # (B*W, A)
        acts = acts[~torch.isnan(acts).any(-1)]  # labelled steps only (hand-over trials hold unlabelled ones)
        return float(((acts - acts.mean(0)) ** 2).mean())

    def obs_stats(self, windows: int = 512, floor: float = 0.01) -> tuple[list[float], list[float]]:
        """Per-dimension mean and standard deviation (at least ``floor``: constant dimensions such as a hidden
        goal's stay 0 after the shift) of the observations of the stream's first ``windows`` windows."""
        obs = self.batch(range(min(windows, len(self.dataset))))["obs"].flatten(0, 1).double()  # (B*W, D)
        return obs.mean(0).tolist(), obs.std(0).clamp_min(floor).tolist()

    def task_pools(self) -> list[dict]:
        return [
            {"dir": str(h.path), "split": h.manifest["settings"]["split"],
             "task_pool": h.manifest["settings"].get("task_pool"), "tasks": len(h.manifest["tasks"]),
             "source": h.manifest.get("source", "expert histories")}
            for h in self.dataset.sources
        ]


def pool_summary(pools: list[dict]) -> str:
    """One line for reports: which task pools (and how many distinct tasks) trained the policy."""
    return " + ".join(f"{p['split']} {p['task_pool']} ({p['tasks']} tasks"
                      f"{', relabelled' if 'policy' in str(p['source']) else ''})" for p in pools)


# ---------------------------------------------------------------------------------------- budget
def data_budget(manifests: list[dict], target: str) -> Budget:
    """What the histories (their manifests) cost: every step played, and the steps whose expert action is
    a training target. Target 'expert': the labelled steps (all but a hand-over's context-only episodes);
    target 'taken': the steps the noisy expert played (none of a policy's own). Generation CPU is the
    shards' ``cpu_seconds``, None if any shard does not record it."""
    total = Budget()
    for m in manifests:
        s, shards = m["settings"], m["shards"].values()
        steps = sum(int(r["steps"]) for r in shards)  # stored decisions
        k, handover = int(s["episodes_per_trial"]), int(s.get("handover", 0))
        after_handover = steps * (k - handover) // k  # a trial's episodes all have the same length
        labels = after_handover if target == "expert" or not s.get("policy") or handover else 0
        cpu = None if any("cpu_seconds" not in r for r in shards) else sum(r["cpu_seconds"] for r in shards) / 60
        # simulator steps: each stored decision held its action action_repeat of them (whole episodes)
        k = int(s.get("action_repeat", 1))
        env_steps = steps if k == 1 else steps // decisions_per_episode(int(s["episode_length"]), k) * int(s["episode_length"])
        total = total.add(Budget(env_steps=env_steps, expert_labels=labels, data_cpu_minutes=cpu,
                                 seeds={"data": [int(s["seed"])]}))
    return total


def init_cost(init_from: str, data: list[str], target: str, out: str | Path, loops: bool = True) -> Budget:
    """What a run started from another (``--init-from``) inherits besides its own data: the init's training
    loops (unless ``loops`` is False), and the data the init trained on that ``data`` does not hold (the union
    of the two runs' data, so data they share counts once). Budget() with a warning where the init records no
    budget."""
    init = Path(init_from)
    spent = run_budget(init)
    if spent is None:
        warnings.warn(f"--init-from {init} records no budget.json (trained before budgets were): the budget of "
                      f"{out} counts its own data and training only", stacklevel=2)
        return Budget()
    ours = {str(Path(d).resolve()) for d in data}
    record = init / "training.json"
    theirs = json.loads(record.read_text()).get("data", []) if record.is_file() else []
    extra = [d for d in dict.fromkeys(theirs) if str(Path(d).resolve()) not in ours]
    missing = [d for d in extra if not Path(d).is_dir()]
    if missing:
        warnings.warn(f"the data {init} trained on is gone from {', '.join(missing)}: the budget of {out} "
                      f"does not count what it cost", stacklevel=2)
    extra = data_budget([load_histories(d, verify=False).manifest for d in extra if d not in missing], target)
    return extra.add(Budget.from_json(spent).training_loop()) if loops else extra


def upfront_cost(cfg: TrainConfig, manifests: list[dict]) -> Budget:
    """Everything a run's budget counts besides its own training loop: its data and what its ``--init-from``
    cost (``init_cost``). A phase of a relabelling run (``RUN/round-r/train``) counts its data only:
    ``run_budget`` sums the phases' loops and ``pretrain`` adds the init's."""
    cost = data_budget(manifests, cfg.target)
    if not cfg.init_from or round_phase(cfg.out) is not None:
        return cost
    return cost.add(init_cost(cfg.init_from, cfg.data, cfg.target, cfg.out))


def _spent(accelerator, before: Budget, cpu0: float, wall0: float) -> Budget:
    """``before`` plus this process group's CPU and wall time since (cpu0, wall0); every process calls it."""
    cpu = accelerator.reduce(torch.tensor(time.process_time() - cpu0, dtype=torch.float64, device=accelerator.device),
                             reduction="sum")
    return dataclasses.replace(before, train_cpu_minutes=before.train_cpu_minutes + float(cpu) / 60,
                               wall_minutes=before.wall_minutes + (time.perf_counter() - wall0) / 60)


# ------------------------------------------------------------------------------------------ loop
class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and its last good checkpoint stays."""


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) pretraining; returns the final log record."""
    check_train(cfg)
    cpu0, wall0 = time.process_time(), time.perf_counter()  # this piece of the run's cost, for its budget
    run = Path(cfg.out)
    checkpoints = complete_checkpoints(run)
    if checkpoints and not cfg.resume:
        raise UsageError(f"{run} already holds checkpoints; pass --resume to continue it, or choose another --out")
    state = checkpoint.load_json(checkpoints[-1] / STATE_NAME, "training checkpoint") if checkpoints else None
    done = state["step"] if state else 0
    if done >= cfg.steps and all((run / n).is_file() for n in ("model.safetensors", "budget.json", "training.json")):
        # a finished run resumed: nothing is built or trained, and its budget, final loss, configuration and
        # weights stay as they were written
        return {"step": done, "loss": json.loads((run / "training.json").read_text()).get("final_loss")}
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True on a machine without CUDA makes several launched processes MULTI_CPU (gloo).
    # The schedule counts optimizer steps; accelerate would otherwise step it once per process.

    use_tb = cfg.tensorboard and is_tensorboard_available()
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False,
                              log_with="tensorboard" if use_tb else None, project_dir=str(run))
    if use_tb:
        accelerator.init_trackers("tensorboard")
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UsageError(
            f"batch size {cfg.batch_size} must divide among {world} processes x {cfg.grad_accum} accumulation steps"
        )

    stream = WindowStream(cfg.data, episodes_per_window=cfg.episodes_per_window, seed=cfg.seed,
                          from_trial_start=cfg.context_stride > 0)
    upfront = upfront_cost(cfg, [h.manifest for h in stream.dataset.sources])  # every checkpoint's share
    set_seed(cfg.seed)
    context_episodes = cfg.context_episodes or cfg.episodes_per_window
    model_config = ICLPolicyConfig(
        d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, action_head=cfg.action_head,
        dropout=cfg.dropout, max_episode_length=stream.episode_length,
        max_context_episodes=context_episodes, obs_dim=stream.obs_dim,
        act_dim=stream.act_dim, explore_episodes=cfg.explore_episodes, explore_scale=cfg.explore_scale,
        explore_kind=cfg.explore_kind, context_stride=cfg.context_stride, context_keep_best=cfg.context_keep_best,
        context_best_steps=cfg.context_best_steps,
        # compact windows are a trial's first episodes_per_window episodes: later indices never trained
        trained_episodes=min(cfg.episodes_per_window, context_episodes) if cfg.context_stride else 0,
        action_repeat=stream.action_repeat,
    )
    start_model = ICLPolicy.from_pretrained(cfg.init_from) if cfg.init_from else None
    if start_model is not None:  # the init's weights read its observation statistics
        model_config.obs_mean, model_config.obs_std = start_model.config.obs_mean, start_model.config.obs_std
    elif cfg.normalize_obs:
        model_config.obs_mean, model_config.obs_std = stream.obs_stats()
    model = ICLPolicy(model_config)
    if start_model is not None:
        shape = ("obs_dim", "act_dim", "d_model", "n_layer", "n_head", "action_head", "max_episode_length",
                 "max_context_episodes", "context_stride", "action_repeat")  # not the kept best steps: a mask, no weight
        differ = [k for k in shape if getattr(start_model.config, k) != getattr(model_config, k)]
        if differ:
            raise UsageError(f"--init-from {cfg.init_from} differs from this run's model in {', '.join(differ)}")
        model.load_state_dict(start_model.state_dict())
        model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start, spent = 0, Budget(seeds={"train": [cfg.seed], "data": []})  # optimizer steps, CPU and wall time
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]))  # the training state read above, before any set-up
        start = state["step"]
        if "budget" in state:
            spent = Budget.from_json(state["budget"])
        else:
            spent.optimizer_steps = start
            warnings.warn(f"{checkpoints[-1]} predates budget accounting: the CPU and wall time before step "
                          f"{start} are not in this run's budget.json", stacklevel=2)
    log = run / "log.jsonl"
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "train_config.json", dataclasses.asdict(cfg))
        trim_log(log, start)
        if start == 0:
            baseline = stream.mean_action_mse(cfg.target)
            atomic_write_json(run / "baseline.json", {"mean_action_mse": baseline, "target": cfg.target})

    micro = cfg.batch_size // (world * cfg.grad_accum)
    tokens_per_step = cfg.batch_size * cfg.episodes_per_window * stream.episode_length
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and accelerator.is_main_process),
               desc="pretrain", unit="step", dynamic_ncols=True)
    record: dict = {}
    t_last, steps_since = time.perf_counter(), 0
    model.train()
    for step in range(start, cfg.steps):
        # sample: this process's share of the global batch `step`, in grad_accum micro-batches
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=accelerator.device)
        for k in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + k) * micro * world + rank * micro
            batch = {n: v.to(accelerator.device) for n, v in stream.batch(range(first, first + micro)).items()}
            if cfg.trace_windows:
                with open(run / f"windows-rank{rank}.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "windows": batch["window"].tolist()}) + "\n")
            # compute
            with accelerator.autocast():
                loss = window_loss(model, batch, cfg.target)
            accelerator.backward(loss / cfg.grad_accum)
            total += loss.detach() / cfg.grad_accum
        mean_loss = accelerator.reduce(total, reduction="mean").item()
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(
                f"loss became {mean_loss} at step {step}; stopped without saving. The last good checkpoint "
                f"in {run / 'checkpoints'} is intact (lower --lr or check the data)"
            )
        # update
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        spent.optimizer_steps += 1
        steps_since += 1
        done = step + 1
        # log
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            record = {
                "step": done, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": steps_since * tokens_per_step / (now - t_last),
                "tokens": done * tokens_per_step,
            }
            t_last, steps_since = now, 0
        if cfg.eval_every and done % cfg.eval_every == 0:
            if accelerator.is_main_process:
                logged = record if record.get("step") == done else {"step": done, "loss": mean_loss}
                record = {**logged, **periodic_evaluation(accelerator.unwrap_model(model), stream, cfg)}
                model.train()
            accelerator.wait_for_everyone()
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if record.get("step") == done:
            if accelerator.is_main_process:
                with open(log, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if use_tb:
                    accelerator.log(_scalars(record), step=done)
                post = {"loss": f"{record.get('loss', mean_loss):.4f}", "tok_s": f"{record.get('tokens_per_s', 0):.0f}"}
                if "eval_success" in record:
                    post["eval"] = "/".join(f"{x:.2f}" for x in record["eval_success"])
                bar.set_postfix(post)
        bar.update(1)
        # checkpoint
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            so_far = _spent(accelerator, spent, cpu0, wall0)
            save_checkpoint(accelerator, run, done, cfg.keep_checkpoints, so_far, accelerator.unwrap_model(model).config,
                            upfront.add(so_far))
        if cfg.kill_after and done - start >= cfg.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    for tracker in accelerator.trackers:  # close the TensorBoard writer; end_training() would also
        tracker.finish()                  # destroy the process group that the barrier below needs

    spent = _spent(accelerator, spent, cpu0, wall0)
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        final.save_pretrained(run)
        write_budget(run, upfront.add(spent))
        atomic_write_json(run / "training.json", {
            "data": [str(Path(d).resolve()) for d in cfg.data],
            "task_pools": stream.task_pools(),
            "task_pool": pool_summary(stream.task_pools()),
            "suite": stream.suite,
            "target": cfg.target,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "processes": world,
            "final_loss": record.get("loss"),
            "versions": versions(),
        })
    accelerator.wait_for_everyone()
    return record


def periodic_evaluation(model, stream: "WindowStream", cfg: TrainConfig) -> dict:
    """Success per episode of the in-context agent on the first ``eval_tasks`` tasks of ``eval_split``:
    one trial per task of ``episodes_per_window`` episodes, deterministic actions, env seed 0."""

    check_playable(stream.suite, cfg.eval_split)
    tasks = get_suite(stream.suite).tasks(cfg.eval_split, 0)[: cfg.eval_tasks]
    agent = InContextAgent(model, deterministic=True, device=next(model.parameters()).device)
    episodes = list(play_trials(agent, tasks, env_seed=0, agent_seed=0, adaptation_episodes=cfg.episodes_per_window,
                                evaluation_episodes=0, episode_length=stream.simulator_episode_length,
                                action_repeat=stream.action_repeat))
    mean = lambda key: [float(np.mean([r[key] for r in records])) for records in episodes]  # noqa: E731
    return {"eval_success": mean("success"), "eval_return": mean("return"), "eval_split": cfg.eval_split,
            "eval_tasks": len(tasks)}


def _scalars(record: dict) -> dict:
    """The numbers of a log record as TensorBoard scalars (per-episode success as eval/success_ep<k>)."""
    out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "eval_tasks")}
    for key in ("success", "return"):
        for k, v in enumerate(record.get(f"eval_{key}", []), start=1):
            out[f"eval/{key}_ep{k}"] = v
    return out


def heldout_loss(model_dir: str | Path, data: list[str], target: str = "expert", max_windows: int = 512,
                 batch_size: int = 16, episodes_per_window: int | None = None, model: ICLPolicy | None = None) -> float:
    """Mean action loss of a trained policy on histories it never saw (e.g. the test split's tasks), on windows
    shaped as its training's: ``episodes_per_window`` episodes (None: the run's train_config.json says, else the
    model's context length), starting at a trial's first episode under the compact context. ``model``: the
    policy already loaded from ``model_dir`` (None: loaded here)."""
    model = (ICLPolicy.from_pretrained(model_dir) if model is None else model).eval()
    if episodes_per_window is None:
        trained = Path(model_dir) / "train_config.json"
        episodes_per_window = (json.loads(trained.read_text())["episodes_per_window"] if trained.is_file()
                               else model.config.max_context_episodes)
    ds = WindowDataset(data, episodes_per_window, splits=("train", "test"), from_trial_start=model.config.compact)
    n = min(max_windows, len(ds))
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = collate([ds[i] for i in range(start, min(start + batch_size, n))])
            total += float(window_loss(model, batch, target)) * batch["obs"].shape[0]
    return total / n


# ------------------------------------------------------------------------------ relabel rounds
def pretrain(cfg: TrainConfig) -> dict:
    """Pretraining with ``relabel_rounds`` on-policy relabelling rounds (plain ``train`` for 0).

    Round r lives in ``out/round-r``: its relabelled trials (r >= 1, a histories directory played by
    round r-1's policy) and its training run (initialised from round r-1's weights). Every piece
    resumes by itself, so rerunning with --resume continues a killed run where it stopped. The run's
    budget.json counts every histories directory once and every round's optimizer steps and time.
    """
    check_train(cfg)
    if cfg.relabel_rounds == 0:
        return train(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would play the round's trials
        raise UsageError(f"--relabel-rounds {cfg.relabel_rounds} runs in one process only, not under accelerate "
                         f"launch with {os.environ['WORLD_SIZE']} processes; run it without accelerate launch")

    run = Path(cfg.out)
    if (run / "round-0").exists() and not cfg.resume:
        raise UsageError(f"{run} already holds relabelling rounds; pass --resume to continue it, or choose another --out")
    base = load_histories(cfg.data[0], verify=False).manifest["settings"]
    if cfg.relabel_new_tasks and base["task_pool"] == "benchmark":
        raise UsageError(f"relabel_new_tasks needs base data drawn from new tasks (task_pool 'fresh' or a count); "
                         f"{cfg.data[0]} has task_pool 'benchmark', the benchmark's fixed train tasks")
    if cfg.relabel_handover >= base["episodes_per_trial"]:
        raise UsageError(f"relabel_handover={cfg.relabel_handover} leaves the expert no episode of the "
                         f"{base['episodes_per_trial']} per trial in {cfg.data[0]}; use 0 to {base['episodes_per_trial'] - 1}")
    phases = cfg.relabel_rounds + 1
    data, init, record, rounds = list(cfg.data), cfg.init_from, {}, []
    for r in range(phases):
        phase = run / f"round-{r}"
        if r > 0:
            relabelled = phase / "relabelled"
            gen = GenerateConfig(
                suite=base["suite"], split="train", task_pool=base["task_pool"],
                trials=cfg.relabel_trials or base["trials"], episodes_per_trial=base["episodes_per_trial"],
                episode_length=base["episode_length"], action_repeat=int(base.get("action_repeat", 1)),
                trials_per_shard=base["trials_per_shard"],
                seed=base["seed"] + (1000 * (r + cfg.relabel_first_round - 1) if cfg.relabel_new_tasks else 0),
                suite_seed=base["suite_seed"], workers=cfg.relabel_workers, policy=str(init),
                handover=cfg.relabel_handover, self_imitation=cfg.relabel_self_imitation,
                expert_goal_offsets=tuple(base.get("expert_goal_offsets", ())),
                **({k: base[k] for k in ("noise_kind", "noise_schedule", "noise_max")} if cfg.relabel_handover else {}),
                action_noise=float(base.get("action_noise", 0.0)) if cfg.relabel_handover else 0.0,
                **({"policy_explore_episodes": cfg.explore_episodes, "policy_explore_scale": cfg.explore_scale,
                    "policy_explore_kind": cfg.explore_kind} if r == 1 and cfg.relabel_init_explores else {}),
            )
            manifest = generate(gen, relabelled, progress=cfg.progress)
            data.append(str(relabelled))
            per_episode = np.sum([s["successful_trials_per_episode"] for s in manifest["shards"].values()], 0)
            rounds.append({"round": r, "data": str(relabelled), "task_seed": gen.seed,
                           "policy_success_per_episode": (per_episode / gen.trials).round(3).tolist()})
        if r == 0 and cfg.relabel_from_init:  # the --init-from policy plays round 1 as it is
            init = Path(cfg.init_from)
            # its training loop stands in as phase 0's, so the run's budget counts it (its data, the base
            # data, is counted by the last phase)
            own = run_budget(init)
            if own is not None and int(os.environ.get("RANK", "0")) == 0:
                write_budget(phase / "train", Budget.from_json(own).training_loop())
            continue
        trained = phases - cfg.relabel_from_init
        steps = cfg.steps // trained + (cfg.steps % trained if r == phases - 1 else 0)
        phase_cfg = dataclasses.replace(cfg, data=data, out=str(phase / "train"), steps=steps,
                                        relabel_rounds=0, relabel_handover=0, relabel_from_init=False, relabel_init_explores=False,
                                        relabel_self_imitation=False, relabel_first_round=1, relabel_workers=1,
                                        init_from=str(init) if init else "",
                                        resume=True, warmup_steps=min(cfg.warmup_steps, steps))
        if not (phase / "train" / "model.safetensors").is_file():
            record = train(phase_cfg)
        init = phase / "train"
    if int(os.environ.get("RANK", "0")) == 0:
        for name in ("config.json", "model.safetensors"):
            atomic_write_bytes(run / name, (init / name).read_bytes())
        training = json.loads((init / "training.json").read_text())
        training.update({"relabel_rounds": rounds, "steps": cfg.steps, "data": [str(Path(d).resolve()) for d in data],
                         "task_pool": f"{pool_summary(training['task_pools'][:len(cfg.data)])}, "
                                      f"+ {cfg.relabel_rounds} relabelling round(s)"})
        atomic_write_json(run / "training.json", training)
        # the last phase trained on all of the run's data: its budget with every phase's loop is the run's
        total = run_budget(run / f"round-{phases - 1}" / "train")
        if total is None:
            warnings.warn(f"a round of {run} was trained before budget accounting: no budget.json for the run",
                          stacklevel=2)
        else:
            total = Budget.from_json(total)
            if cfg.init_from:  # under relabel_from_init, phase 0's stand-in already counts the init's loops
                total = total.add(init_cost(cfg.init_from, data, cfg.target, run, loops=not cfg.relabel_from_init))
            write_budget(run, total)
    return record


# -------------------------------------------------------------------------------- command line
def train_checkpoint(cfg: TrainConfig, out) -> dict:
    """Pretrain (with its relabelling rounds) into ``out``: the learner registry's entry point."""
    record = pretrain(dataclasses.replace(cfg, out=str(out)))
    if record and int(os.environ.get("RANK", "0")) == 0:
        if "tokens_per_s" in record:
            print(f"step {record['step']}: loss {record['loss']:.5f}, {record['tokens_per_s']:.0f} tokens/s")
        else:  # a finished run resumed: nothing was trained
            loss = "not recorded" if record["loss"] is None else f"{record['loss']:.5f}"
            print(f"{out} had finished at step {record['step']} (final loss {loss}); nothing trained")
    return record
