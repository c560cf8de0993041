"""Settings of the gradient meta-learners on Meta-World (MAML, Meta-SGD, Reptile) and of their agents.

Free of torch, so that the command line builds its flags and help from them without importing the
learners. Not for: running anything (``meta_rl.py`` trains, ``rl_agent.py`` acts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.settings import COMMAS, COUNT_OK
from icl_metarl.harness.suites import (
    check_action_repeat,
    check_episode_length,
    get_suite,
    parse_goal_offsets,
    parse_task_pool,
)

ALGOS = ("maml", "meta-sgd", "reptile")
#: what the outer loss of MAML and Meta-SGD learns from (the inner step always learns from reward alone)
OUTER_LOSSES = ("ppo", "imitate")
#: config.json "model_type" of every gradient meta-RL checkpoint (the algorithm is in its config)
MODEL_TYPE = "gradient_meta_rl"
SINUSOID_ALGOS = ("maml", "fomaml", "meta-sgd", "reptile", "pretrain")
#: the settings a meta-RL run leaves unset (None) take its algorithm's values: MAML-RL's one inner step and one
#: query episode per task; Reptile's k, and no query episodes, since it learns only from its inner loop's episodes
ALGO_DEFAULTS = {"maml": {"inner_steps": 1, "query_episodes": 1},
                 "meta-sgd": {"inner_steps": 1, "query_episodes": 1},
                 "reptile": {"inner_steps": 3, "query_episodes": 0}}
assert set(ALGO_DEFAULTS) == set(ALGOS)
#: Reptile's k on the sinusoid (the few-shot study's default too)
SINUSOID_REPTILE_STEPS = 5


def check_inner_steps(steps: int) -> int:
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"inner steps must be an integer >= 1, got {steps!r}")
    return steps


def check_reptile_steps(steps: int) -> int:
    # Nichol et al. 2018, sec. 5: with one SGD step, E[theta - phi] is the multi-task gradient, not a meta-update.
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise UsageError(f"reptile needs inner steps >= 2, got {steps!r}: with one SGD step its update is the "
                         f"plain multi-task gradient (Nichol et al. 2018, section 5)")
    return steps


def check_step_size(step_size: float, what: str = "inner step size") -> float:
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise UsageError(f"{what} must be a finite number > 0, got {step_size!r}")
    return float(step_size)


@dataclass
class MetaRLConfig:
    """One gradient meta-RL run; CPU-friendly defaults except the benchmark's episode length."""

    algo: str = "maml"
    """maml (second order through the inner step), meta-sgd (also learns per-parameter step sizes), reptile."""
    suite: str = "ML1:reach-v3"
    """Meta-World suite; meta-training uses its train split (or new tasks of its train environments)."""
    task_pool: str = field(default="benchmark", metadata={COUNT_OK: True})
    """benchmark (the split's train tasks), N (N distinct new train tasks, never a test task), fresh (new every draw)."""
    suite_seed: int = 0
    """Meta-World benchmark seed (which tasks are train and test)."""
    iterations: int = 200
    """Meta-iterations."""
    meta_batch: int = 10
    """Tasks per meta-iteration, split evenly among processes."""
    episode_length: int = 500
    """Simulator steps per episode (the benchmark's 500; 100-150 for CPU runs)."""
    action_repeat: int = 1
    """Decision interval k: the policy acts every k-th simulator step, its action held in between (ceil(episode_length
    / k) decisions per episode, each with the summed reward); the checkpoint is evaluated at this interval only."""
    adapt_episodes: int = 1
    """Episodes played with the pre-adaptation policy per task; the inner step(s) learn from them."""
    query_episodes: int | None = None
    """Episodes played with each adapted policy, which the outer loss learns from (None: 1); reptile plays none
    (None or 0): it has no outer loss."""
    outer_loss: str = "ppo"
    """ppo (reward: PPO's clipped surrogate on the adapted policy's episodes, MAML-RL) or imitate (the
    scripted expert's action on the states the adapted policy visits, the supervision the in-context
    agent trains on: Guided Meta-Policy Search, Mendonca et al. 2019); the inner step learns from reward
    either way, so at test time the agent sees what the in-context agent sees. MAML and Meta-SGD only."""
    expert_goal_offsets: tuple[str, ...] = field(default=(), metadata={COMMAS: False})
    """outer-loss imitate: ENV=x,y,z (metres), tell the labelling expert the goal shifted by this in ENV,
    as the in-context agent's histories did (e.g. reach-v3=0,0,0.045); each ENV an environment of the suite"""
    inner_steps: int | None = None
    """Policy-gradient steps on the adaptation episodes (None: the algorithm's own: 1 for maml and meta-sgd;
    reptile 3, its k, which must be >= 2)."""
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
        if self.outer_loss not in OUTER_LOSSES:
            raise choice_error("outer loss", self.outer_loss, OUTER_LOSSES)
        if self.algo == "reptile" and self.outer_loss != "ppo":
            raise UsageError(f"reptile has no outer loss (it moves toward the inner steps' weights); "
                             f"outer-loss {self.outer_loss!r} needs maml or meta-sgd")
        get_suite(self.suite)
        parse_task_pool(self.task_pool)
        check_episode_length(self.episode_length)
        check_action_repeat(self.action_repeat)
        parse_goal_offsets(self.expert_goal_offsets, self.suite)
        for what in ("iterations", "meta_batch", "adapt_episodes", "ppo_epochs", "checkpoint_every"):
            v = getattr(self, what)
            if not isinstance(v, int) or v < 1:
                raise UsageError(f"{what.replace('_', '-')} must be an integer >= 1, got {v!r}")
        filled = self._filled()
        steps, query = filled["inner_steps"], filled["query_episodes"]
        if self.algo == "reptile":
            check_reptile_steps(steps)
            if query != 0:
                raise UsageError(f"reptile plays no query episodes (it learns only from its inner loop's), so "
                                 f"query-episodes must be 0 or unset, got {query!r}")
        else:
            check_inner_steps(steps)
            if not isinstance(query, int) or query < 1:
                raise UsageError(f"query-episodes must be an integer >= 1, got {query!r}")
        check_step_size(self.inner_lr, "inner-lr")
        check_step_size(self.meta_lr, "meta-lr")
        check_step_size(self.clip, "clip")
        for what in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, what) <= 1.0:
                raise UsageError(f"{what.replace('_', '-')} must be in [0, 1], got {getattr(self, what)!r}")
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.hidden or min(self.hidden) < 1:
            raise UsageError(f"hidden widths must be positive integers, got {self.hidden!r}")
        check_step_size(self.init_std, "init-std")

    def _filled(self) -> dict:
        """``inner_steps`` and ``query_episodes``, each from ``ALGO_DEFAULTS`` where unset (None)."""
        return {k: d if getattr(self, k) is None else getattr(self, k) for k, d in ALGO_DEFAULTS[self.algo].items()}

    def resolved(self) -> MetaRLConfig:
        """This run with its unset settings filled in: what it trains with and what its checkpoints record.
        They stay None until here, so that a study's configuration can lay an algorithm over a base run
        (``dataclasses.replace``) and still get that algorithm's values."""
        return replace(self, **self._filled())


@dataclass
class GradientAgentOptions:
    """How an evaluated gradient meta-RL agent acts (None: as the checkpoint says)."""

    deterministic: bool | None = None
    """gradient checkpoints: act with the policy's mean action once adapted (non-adaptive: in every
    episode); the episodes the inner step learns from are still sampled, since a policy-gradient step on
    mean actions moves only log_std (docs/results.md, issue 22)"""


@dataclass
class SinusoidConfig:
    """One sinusoid meta-training run."""

    algo: str = "maml"
    """maml, fomaml, meta-sgd, reptile, or pretrain (plain regression on all tasks, the baseline)."""
    family: str = "maml-sine"
    """task family (icl_metarl.harness.regression_tasks): maml-sine, metasgd-sine, linear, ...; an unknown
    name is an error that lists them."""
    shots: int = 10
    """K: support points per task (the query set has K points too during training); with min_shots, the most."""
    min_shots: int | None = None
    """the fewest support points: each meta-update draws its K uniformly from min_shots..shots (one K for all
    its tasks; the query sets keep shots points), as the in-context regressor trains on 1..its most; None:
    every meta-update at K = shots."""
    iterations: int = 2000
    """Meta-updates (the papers use 70,000)."""
    meta_batch: int = 25
    """Tasks per meta-update, split evenly among processes."""
    inner_steps: int | None = None
    """Inner gradient steps during training and evaluation (None: 1; reptile 5, its k, which must be >= 2)."""
    inner_lr: float = 0.01
    """Inner step size (Meta-SGD: see meta_sgd_init; pretrain: the fine-tuning step at evaluation)."""
    meta_lr: float = 1e-3
    """Adam learning rate of the meta-update (Reptile: its epsilon, with plain SGD)."""
    meta_sgd_init: str = "uniform"
    """Meta-SGD step-size init: 'uniform' in [0.005, 0.1] (the paper's) or 'constant' (= inner_lr)."""
    hidden: int = 40
    """Width of the two hidden layers."""
    seed: int = 0
    """Seeds the initial weights and the training tasks (evaluation uses its own seed)."""
    log_every: int = 500
    """Print the running training loss every this many iterations (0: never)."""
    threads: int = 1
    """torch intra-op threads; 1 because a 40-unit net gains nothing from more and a shared CPU loses much."""

    def __post_init__(self):
        if self.algo not in SINUSOID_ALGOS:
            raise choice_error("algorithm", self.algo, SINUSOID_ALGOS)
        if self.meta_sgd_init not in ("uniform", "constant"):
            raise choice_error("meta-sgd init", self.meta_sgd_init, ("uniform", "constant"))
        for what in ("shots", "iterations", "meta_batch", "hidden", "threads"):
            if getattr(self, what) < 1:
                raise UsageError(f"{what} must be >= 1, got {getattr(self, what)}")
        if self.min_shots is not None and not 1 <= self.min_shots <= self.shots:
            raise UsageError(f"min_shots must be in 1..shots ({self.shots}), got {self.min_shots!r}")
        if self.inner_steps is None:  # written into the checkpoint as the number it is
            self.inner_steps = SINUSOID_REPTILE_STEPS if self.algo == "reptile" else 1
        check_step_size(self.inner_lr, "inner_lr")
        check_step_size(self.meta_lr, "meta_lr")
