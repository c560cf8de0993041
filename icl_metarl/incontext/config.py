"""Settings of the in-context learner: history generation and pretraining, with their checks.

Kept apart from the code that runs them (and free of torch) so that the command line can build its
flags and help from these dataclasses without importing the learner. Not for: running anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.settings import COMMAS, COUNT_OK, FLAGS
from icl_metarl.harness.suites import (
    check_action_repeat,
    check_episode_length,
    check_split,
    get_suite,
    parse_goal_offsets,
    parse_task_pool,
)

NOISE_KINDS = ("uniform", "gaussian", "goal")
NOISE_SCHEDULES = ("linear", "cosine", "none", "random")
TARGETS = ("expert", "taken")
#: config.json "model_type" of an in-context policy checkpoint
MODEL_TYPE = "icl_metarl_policy"
EXPLORE_KINDS = ("offset", "step")  # a constant action offset per episode; a fresh pre-squash perturbation per decision
MIXED_PRECISION = ("auto", "no", "bf16")


@dataclass
class GenerateConfig:
    """Settings of one histories directory (everything but ``workers`` determines the data)."""

    suite: str = "ML1:reach-v3"
    """Suite name: ML1:<env>-v3, ML10 or ML45."""
    split: str = "train"
    """Split to play; 'validation' and 'test' only with the benchmark pool, for held-out histories."""
    task_pool: str = field(default="benchmark", metadata={COUNT_OK: True})
    """'benchmark' (the split's tasks), N (N distinct new train tasks) or 'fresh' (a new task per trial)."""
    trials: int = 50
    """Number of trials to play."""
    episodes_per_trial: int = field(default=10, metadata={FLAGS: ("--episodes",)})
    """Episodes per trial (the task stays fixed across them); at least 2, so a trial can improve."""
    episode_length: int = 500
    """Steps per episode (Meta-World's own limit is 500)."""
    action_repeat: int = 1
    """Decision interval k: the player acts every k-th simulator step, its action held in between; each
    stored step is one decision (ceil(episode_length / k) per episode) with the summed reward."""
    noise_kind: str = "uniform"
    """'uniform': the expert's action is replaced by a uniform random one with probability level;
    'gaussian': Gaussian noise of standard deviation level is added, then clipped to [-1, 1];
    'goal': the learner heads for a wrong goal, the true one moved by Gaussian noise of standard
    deviation level (metres, e.g. 0.15) drawn once per episode, so episodes explore whole places."""
    noise_schedule: str = "linear"
    """How the level falls across the episodes of a trial: linear or cosine from noise_max to 0, none, or
    random: drawn uniformly from [0, noise_max] for every episode of every trial, independent of the
    episode index, so a late episode's end point does not give the goal away (only its rewards do)."""
    noise_max: float = 1.0
    """Noise level of the first episode (probability for uniform, standard deviation for gaussian)."""
    action_noise: float = 0.0
    """Gaussian noise of this standard deviation added to every action the expert executes, on top of
    noise_kind, then clipped to [-1, 1] (DART, Laskey et al. 2017): the trials leave the expert's path and
    every step is still labelled with the expert's action there, so the learner sees how to recover. The
    goal kind alone never perturbs an environment whose expert ignores the goal (door, drawer, button).
    0: none."""
    trials_per_shard: int = 10
    """Trials per shard: the unit of parallel work, of resuming and of checksumming."""
    seed: int = 0
    """Seed of the noise, the task order and the task pool."""
    suite_seed: int = 0
    """Meta-World benchmark seed: which train/test tasks the suite has (use the evaluator's)."""
    expert_goal_offsets: tuple[str, ...] = field(default=(), metadata={COMMAS: False})
    """ENV=x,y,z (metres): tell the expert the goal shifted by this in environment ENV, for every action
    and label (e.g. reach-v3=0,0,0.045: its experts aim the hand, success is measured at the TCP;
    suites.MEASURED_GOAL_OFFSETS); each ENV must be an environment of the suite. Default: none."""
    workers: int = 0
    """Worker processes; 0 = one per core (one per process under accelerate launch). Does not change the data."""
    policy: str = ""
    """On-policy relabelling: an in-context checkpoint that plays the trials with its own context
    (noise settings unused); every step is still labelled with the expert's action. Empty: the expert."""
    handover: int = 0
    """With a policy: it plays only the first this many episodes of each trial, which are then context
    only (their labels are NaN: no loss), and the noisy expert (noise settings) plays and labels the
    rest. 0: the policy plays every episode and every step is labelled (DAgger)."""
    self_imitation: bool = False
    """With a policy playing every episode: once an episode of a trial succeeds, each later episode's steps
    are labelled with the actions that the latest successful episode took at the same decision, not the
    expert's (replaying them repeats the success exactly: a trial's episodes start from one state,
    ``scripts/replay_check.py``). The target "repeat what worked", which the expert's labels never teach
    and which a learner needs on environments whose skill it lacks. The expert still labels the rest."""
    policy_explore_episodes: int | None = None
    """With a policy: it explores in the first this many episodes of each trial (None: as its config.json
    says; the same for the two settings below)"""
    policy_explore_scale: float | None = None
    """With a policy: the standard deviation of its exploration"""
    policy_explore_kind: str | None = None
    """With a policy: 'offset' (a constant action offset per exploring episode) or 'step' (a fresh
    pre-squash perturbation at every decision)"""


def check_generate(cfg: GenerateConfig) -> GenerateConfig:
    """Reject settings that cannot be met, each with a one-line message naming the value."""
    get_suite(cfg.suite)
    check_split(cfg.split)
    check_episode_length(cfg.episode_length)
    check_action_repeat(cfg.action_repeat)
    parse_goal_offsets(cfg.expert_goal_offsets, cfg.suite)
    for name in ("trials", "trials_per_shard"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(cfg.episodes_per_trial, (int, np.integer)) or cfg.episodes_per_trial < 2:
        raise UsageError(f"episodes_per_trial must be an integer >= 2 (a trial must be able to improve), "
                         f"got {cfg.episodes_per_trial!r}")
    if cfg.noise_kind not in NOISE_KINDS:
        raise choice_error("noise kind", cfg.noise_kind, NOISE_KINDS)
    if cfg.noise_schedule not in NOISE_SCHEDULES:
        raise choice_error("noise schedule", cfg.noise_schedule, NOISE_SCHEDULES)
    if not 0.0 <= cfg.noise_max or (cfg.noise_kind == "uniform" and cfg.noise_max > 1.0):
        raise UsageError(f"noise_max must be in [0, 1] for uniform noise and >= 0 for gaussian or goal, got {cfg.noise_max!r}")
    if not isinstance(cfg.workers, (int, np.integer)) or cfg.workers < 0:
        raise UsageError(f"workers must be >= 0 (0 = one per core), got {cfg.workers!r}")
    if not 0.0 <= cfg.action_noise <= 2.0:
        raise UsageError(f"action_noise must be a standard deviation in [0, 2], got {cfg.action_noise!r}")
    if not isinstance(cfg.handover, (int, np.integer)) or not 0 <= cfg.handover < cfg.episodes_per_trial:
        raise UsageError(f"handover must be an integer in [0, episodes_per_trial={cfg.episodes_per_trial}), "
                         f"got {cfg.handover!r}")
    if cfg.handover and not cfg.policy:
        raise UsageError(f"handover={cfg.handover} needs a policy that plays the episodes before it")
    if cfg.self_imitation and (not cfg.policy or cfg.handover):
        raise UsageError(f"self_imitation labels a policy's episodes with its own successful ones: it needs a policy "
                         f"that plays every episode (handover 0), got policy={cfg.policy!r}, handover={cfg.handover}")
    explore = {k: getattr(cfg, k) for k in ("policy_explore_episodes", "policy_explore_scale", "policy_explore_kind")}
    if not cfg.policy and any(v is not None for v in explore.values()):
        raise UsageError(f"{', '.join(k for k, v in explore.items() if v is not None)}: only a policy explores "
                         f"(--policy is empty)")
    if cfg.policy_explore_episodes is not None and cfg.policy_explore_episodes < 0:
        raise UsageError(f"policy_explore_episodes must be >= 0, got {cfg.policy_explore_episodes}")
    if cfg.policy_explore_scale is not None and not cfg.policy_explore_scale >= 0:
        raise UsageError(f"policy_explore_scale must be >= 0, got {cfg.policy_explore_scale}")
    if cfg.policy_explore_kind is not None and cfg.policy_explore_kind not in EXPLORE_KINDS:
        raise choice_error("policy_explore_kind", cfg.policy_explore_kind, EXPLORE_KINDS)
    if cfg.policy and not (Path(cfg.policy) / "model.safetensors").is_file():
        raise UsageError(f"policy {cfg.policy!r} is not an in-context checkpoint directory (no model.safetensors)")
    pool = parse_task_pool(cfg.task_pool)
    if cfg.split != "train" and pool != "benchmark":
        raise UsageError(f"task pool {cfg.task_pool!r} draws new train tasks; with split {cfg.split!r} only "
                         f"'benchmark' is valid")
    if isinstance(pool, int) and pool > cfg.trials:
        raise UsageError(f"task pool {pool} needs at least {pool} trials to play each task once, got trials={cfg.trials}")
    return cfg


@dataclass
class TrainConfig:
    """Everything a pretraining run depends on; saved as ``train_config.json`` in the run directory."""

    data: list[str] = field(default_factory=list)
    """history directories written by `icl-metarl generate` (several: relabelled rounds add theirs)"""
    out: str = "runs/icl"
    """run directory: final model (config.json, model.safetensors), log.jsonl, checkpoints/"""
    target: str = "expert"
    """training target: 'expert' (DPT: the expert's action for the state) or 'taken' (AD-eps)"""
    episodes_per_window: int = 4
    """whole consecutive episodes of one trial per training window (the model's trained context)"""
    context_stride: int = 0
    """0: the full context (every token of the last episodes_per_window episodes). s >= 1: the compact
    cross-episode context: earlier episodes by every s-th step and their last, the current one in full;
    windows are then the first episodes_per_window episodes of each trial, read under that mask"""
    context_keep_best: bool = False
    """compact context: each earlier episode also keeps its step of highest previous reward among those
    the stride drops (where its reward peaked), one token more per episode"""
    context_best_steps: int = 1
    """compact context with --context-keep-best: how many of the highest-rewarded dropped steps each earlier
    episode keeps (ties at the top spread evenly in time: where the reward is flat inside a success region,
    they span it)"""
    context_episodes: int = 0
    """compact context: the most episodes of a trial the model reads when acting (its episode-index table
    and KV cache); 0: episodes_per_window. Set it to the evaluation's K + E (e.g. 13)"""
    batch_size: int = 8
    """windows per optimizer step over all processes (each process takes batch_size / processes)"""
    grad_accum: int = 1
    """micro-batches per optimizer step (each of batch_size / grad_accum windows)"""
    steps: int = 1000
    """optimizer steps"""
    lr: float = 1e-3
    """peak learning rate of AdamW"""
    min_lr_ratio: float = 0.1
    """the cosine schedule ends at lr * min_lr_ratio"""
    warmup_steps: int = 50
    """linear warm-up steps before the cosine decay"""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    mixed_precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'no' or 'bf16'"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, slower)"""
    d_model: int = 64
    """model width"""
    n_layer: int = 3
    """Transformer blocks"""
    n_head: int = 4
    """attention heads"""
    action_head: str = "deterministic"
    """'deterministic' (MSE) or 'tanh_gaussian' (NLL)"""
    dropout: float = 0.0
    """dropout during training"""
    threads: int = 0
    """torch CPU threads per process (0: torch's default); 1 is fastest on a busy 2-core machine"""
    log_every: int = 10
    """steps between log lines"""
    checkpoint_every: int = 200
    """steps between full training-state checkpoints (0: only at the end)"""
    keep_checkpoints: int = 2
    """complete checkpoints kept (the oldest are deleted)"""
    seed: int = 0
    """seed of the model initialisation and the window order"""
    resume: bool = False
    """continue from the newest complete checkpoint in out/checkpoints"""
    progress: bool = True
    """show a progress bar"""
    explore_episodes: int = 0
    """the agent's exploration (saved in config.json, used by relabelling rounds and the evaluator): in the
    first this many episodes of a trial it adds a constant random offset to its actions (0: none)"""
    explore_scale: float = 0.0
    """standard deviation of that offset per action dimension (actions lie in [-1, 1]), e.g. 0.5"""
    explore_kind: str = "offset"
    """'offset' (a constant random offset per exploring episode) or 'step' (a fresh perturbation of the
    pre-squash action at every decision of the exploring episodes, as a Gaussian policy samples)"""
    normalize_obs: bool = False
    """the policy reads observations standardised by the training data's per-dimension mean and standard
    deviation (floored at 0.01; kept in config.json); with --init-from, the init's statistics are kept"""
    init_from: str = ""
    """initialise the weights from this in-context checkpoint directory (empty: random init)"""
    relabel_rounds: int = 0
    """on-policy relabelling (DAgger) rounds: training is cut into rounds+1 phases of steps/(rounds+1);
    after each phase the policy plays trials on the data's task pool with its own context, every step
    labelled with the expert's action, and those trials join the data of the next phase"""
    relabel_trials: int = 0
    """trials the policy plays per round (0: as many as the first data directory holds)"""
    relabel_handover: int = 0
    """relabelling rounds: the policy plays only the first this many episodes of each trial (context
    only, unlabelled) and the noisy expert of the base data plays and labels the rest; 0: the policy
    plays every episode and every step is labelled (DAgger). For experts that cannot label a learner's
    states well (push-v3's lifts the hand whenever it is 2 cm off the puck: docs/results.md)"""
    relabel_self_imitation: bool = False
    """relabelling rounds: once an episode of a relabelled trial succeeds, later episodes are labelled with
    its actions (``GenerateConfig.self_imitation``), the expert's elsewhere; needs relabel_handover 0"""
    relabel_new_tasks: bool = False
    """relabelling rounds draw new tasks each round (the base data's seed + 1000 x round; pools of new
    tasks only, not 'benchmark'); off: every round replays the tasks of the base data's first trials"""
    relabel_first_round: int = 1
    """with relabel_new_tasks: the number of this run's first round, so round r draws its tasks with the base
    data's seed + 1000 x r; set it past an --init-from run's rounds (3 after a 2-round agent) and this run's
    rounds play tasks those rounds did not (1: rounds numbered from 1, as the committed ML10 recipe's rounds 3-4,
    which replayed rounds 1-2's draws)"""
    relabel_workers: int = 1
    """processes that play each relabelling round's trials (the round's data is byte-identical whatever the
    count; training stays in this process)"""
    relabel_from_init: bool = False
    """relabelling rounds: round 1 is played by the --init-from policy itself (no phase on the base data
    alone first); the steps are cut into relabel_rounds phases, one after each round"""
    relabel_init_explores: bool = False
    """with relabel_from_init: the init plays round 1 exploring as this run says (--explore-episodes,
    --explore-scale, --explore-kind), not as its own config.json says (off: as its own, the way the
    committed ML10 recipes were measured)"""
    eval_every: int = 0
    """steps between in-context evaluations on held-out tasks, logged beside the loss (0: none); a
    monitor only: it never selects the checkpoint"""
    eval_tasks: int = 10
    """tasks of eval_split played by each periodic evaluation (one trial each, as many episodes as a window)"""
    eval_split: str = "validation"
    """split whose first eval_tasks tasks the periodic evaluation plays (validation: choose the step to
    keep on new train-environment tasks, not on the test tasks you report)"""
    tensorboard: bool = True
    """also log to out/tensorboard when the tensorboard package is installed"""
    kill_after: int = 0
    """simulate a crash: SIGKILL this process after this many steps of this invocation (tests; 0: never)"""
    trace_windows: bool = False
    """append the stream positions and windows each process trained on to windows-rank<r>.jsonl (tests)"""


def check_train(cfg: TrainConfig) -> TrainConfig:
    if not cfg.data:
        raise UsageError("no --data directory given")
    for d in cfg.data:
        if not Path(d).is_dir():
            raise UsageError(f"data directory {d} does not exist")
    if cfg.target not in ("expert", "taken"):
        raise choice_error("target", cfg.target, ("expert", "taken"))
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise choice_error("mixed precision", cfg.mixed_precision, MIXED_PRECISION)
    check_split(cfg.eval_split)
    if cfg.eval_every < 0:
        raise UsageError(f"eval-every must be >= 0 (0: no periodic evaluation), got {cfg.eval_every}")
    if cfg.context_stride < 0 or cfg.context_episodes < 0:
        raise UsageError(f"context_stride and context_episodes must be >= 0, got {cfg.context_stride} and "
                         f"{cfg.context_episodes}")
    if cfg.context_keep_best and not cfg.context_stride:
        raise UsageError("context-keep-best needs the compact context (--context-stride >= 1)")
    if cfg.context_best_steps < 1:
        raise UsageError(f"context-best-steps must be >= 1, got {cfg.context_best_steps}")
    if cfg.context_best_steps > 1 and not cfg.context_keep_best:
        raise UsageError(f"context-best-steps {cfg.context_best_steps} needs --context-keep-best")
    if cfg.context_episodes and not cfg.context_stride:
        raise UsageError(f"context_episodes={cfg.context_episodes} needs the compact context (context_stride >= 1)")
    for name in ("episodes_per_window", "batch_size", "grad_accum", "steps", "log_every", "eval_tasks"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise UsageError(f"lr must be > 0, got {cfg.lr}")
    if cfg.explore_kind not in EXPLORE_KINDS:
        raise choice_error("explore-kind", cfg.explore_kind, EXPLORE_KINDS)
    if cfg.relabel_rounds < 0 or cfg.relabel_trials < 0:
        raise UsageError(f"relabel rounds and trials must be >= 0, got {cfg.relabel_rounds} and {cfg.relabel_trials}")
    if cfg.relabel_handover < 0 or (cfg.relabel_handover and not cfg.relabel_rounds):
        raise UsageError(f"relabel_handover={cfg.relabel_handover} needs relabel_rounds >= 1 and must be >= 0")
    if cfg.relabel_self_imitation and (not cfg.relabel_rounds or cfg.relabel_handover):
        raise UsageError(f"relabel_self_imitation needs relabel_rounds >= 1 and relabel_handover 0, got "
                         f"relabel_rounds={cfg.relabel_rounds} and relabel_handover={cfg.relabel_handover}")
    if cfg.relabel_from_init and not (cfg.init_from and cfg.relabel_rounds):
        raise UsageError(f"relabel_from_init needs --init-from and relabel_rounds >= 1, got init_from={cfg.init_from!r} "
                         f"and relabel_rounds={cfg.relabel_rounds}")
    if cfg.relabel_first_round < 1 or (cfg.relabel_first_round != 1 and not cfg.relabel_new_tasks):
        raise UsageError(f"relabel_first_round={cfg.relabel_first_round} must be >= 1, and other than 1 only with "
                         f"relabel_new_tasks (it numbers the rounds' task draws)")
    if cfg.relabel_workers < 1:
        raise UsageError(f"relabel_workers={cfg.relabel_workers} must be >= 1")
    if cfg.relabel_init_explores and not cfg.relabel_from_init:
        raise UsageError("relabel_init_explores needs relabel_from_init (only then does the init play a round)")
    if cfg.relabel_rounds and cfg.steps < cfg.relabel_rounds + 1:
        raise UsageError(f"steps={cfg.steps} cannot be cut into {cfg.relabel_rounds + 1} phases (relabel rounds + 1)")
    if cfg.init_from and not (Path(cfg.init_from) / "model.safetensors").is_file():
        raise UsageError(f"--init-from {cfg.init_from}: no model.safetensors there")
    return cfg


@dataclass
class InContextAgentOptions:
    """How an evaluated in-context agent acts (None: as the checkpoint's config.json says)."""

    explore_episodes: int | None = None
    """in-context checkpoints: explore (a constant random action offset per episode) in the first N
    episodes of each trial"""
    explore_scale: float | None = None
    """in-context checkpoints: standard deviation of that offset"""
    explore_kind: str | None = None
    """in-context checkpoints: 'offset' (a constant offset per episode) or 'step' (a fresh perturbation of
    the pre-squash action at every decision, as a Gaussian policy samples); None: as config.json says
    ('offset' for checkpoints saved before the field existed)"""
    cpu_threads: int | None = field(default=None, metadata={FLAGS: ("--agent-threads",)})
    """in-context checkpoints: torch CPU threads of each step (None: 1, safe on a busy machine)"""
    context_stride: int | None = None
    """in-context checkpoints: the context form to act with (0: full, s: compact); it must be the one the
    checkpoint was trained with (None: the checkpoint's); another is refused"""

