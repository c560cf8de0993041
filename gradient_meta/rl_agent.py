"""The gradient meta-RL agent: plays a meta-trained policy and adapts it with policy-gradient steps.

It implements ``icl_metarl.harness.agent.Agent``: every ``adapt_every`` episodes of a trial (up to
``max_adaptations`` times) it takes the inner step(s) on the episodes it just played; ``start_trials``
forgets the adapted weights. ``adaptive=False`` is the non-adaptive baseline (never steps). An episode
whose data an inner step will learn from is sampled; ``deterministic`` acts with the mean in the others.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import einops
import numpy as np
import torch
from torch.func import vmap

from gradient_meta.checkpoint import load_checkpoint
from gradient_meta.config import MODEL_TYPE
from gradient_meta.functional import adapt
from gradient_meta.policy import Params, log_prob, policy_mean
from gradient_meta.rl import ObsNorm, Rollout, advantages, inner_loss, to_batch
from icl_metarl.harness.agent import Agent
from icl_metarl.harness.budget import read_budget
from icl_metarl.harness.errors import UsageError


@dataclass
class RLAgentConfig:
    """How the agent adapts within a trial; defaults repeat what meta-training did."""

    adapt_every: int = 1
    """Take the inner step(s) after every this many episodes, on those episodes."""
    max_adaptations: int = 1
    """Adaptation rounds per trial (meta-training takes one); 0 = never (the non-adaptive baseline)."""
    inner_steps: int = 1
    """Policy-gradient steps per adaptation round."""
    inner_lr: float = 0.1
    """Step size when the checkpoint has no learned (Meta-SGD) step sizes."""
    gamma: float = 0.99
    """Discount of the inner loss's advantages."""
    gae_lambda: float = 0.95
    """GAE lambda of the inner loss's advantages."""
    deterministic: bool = False
    """Act with the policy's mean action once adapted (non-adaptive: always); the episodes an inner step
    learns from are sampled, since a policy-gradient step on mean actions cannot move the mean (issue 22)."""

    def __post_init__(self):
        if not isinstance(self.adapt_every, int) or self.adapt_every < 1:
            raise UsageError(f"adapt_every must be an integer >= 1, got {self.adapt_every!r}")
        if not isinstance(self.max_adaptations, int) or self.max_adaptations < 0:
            raise UsageError(f"max_adaptations must be an integer >= 0, got {self.max_adaptations!r}")


class GradientRLAgent(Agent):
    """A meta-trained Gaussian policy per trial, adapted by the shared inner loop of ``functional.py``."""

    name = "gradient-meta-rl"

    def __init__(self, params: Params, norm: ObsNorm, config: RLAgentConfig, step_sizes: Params | None = None,
                 name: str | None = None, source: str | None = None, action_repeat: int = 1):
        self.params = {k: v.detach().float() for k, v in params.items()}
        self.action_repeat = action_repeat  # the decision interval it was meta-trained at: the evaluator plays it so
        self.step_sizes = {k: v.detach().float() for k, v in step_sizes.items()} if step_sizes else None
        self.norm, self.config = norm, config
        self.source = source
        if name:
            self.name = name
        self.start_trials(1, 0)

    # ---- protocol
    def start_trials(self, num_trials: int, seed: int) -> None:
        self.trial_params = {k: einops.repeat(v, "... -> b ...", b=num_trials).clone() for k, v in self.params.items()}
        self.generator = torch.Generator().manual_seed(int(seed))
        self.episodes: list[dict[str, torch.Tensor]] = []  # since the last adaptation
        self.steps: dict[str, list[torch.Tensor]] = {"obs": [], "act": [], "rew": []}
        self.adaptations = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        x = self.norm(obs)  # (B, 39)
        with torch.no_grad():
            mean = vmap(policy_mean)(self.trial_params, x)  # (B, 4)
            act = mean if self._acts_with_mean() else \
                mean + torch.exp(self.trial_params["log_std"]) * torch.randn(mean.shape, generator=self.generator)
        self.steps["obs"].append(x)
        self.steps["act"].append(act)
        return act.clamp(-1.0, 1.0).numpy()

    def observe(self, reward: np.ndarray, success: np.ndarray) -> None:
        self.steps["rew"].append(torch.as_tensor(reward, dtype=torch.float32))

    def _acts_with_mean(self) -> bool:
        """Whether this episode is played with the mean action: only if ``deterministic``, and only once no
        inner step will learn from it. A policy-gradient step on mean-action episodes is zero for the mean's
        weights (grad log pi(a|s) vanishes at a = mean) and moves only log_std: the agent would not adapt."""
        return self.config.deterministic and self.adaptations >= self.config.max_adaptations

    def end_episode(self) -> None:
        if not self.steps["obs"]:
            return
        ep = {k: torch.stack(v, dim=1) for k, v in self.steps.items()}  # (B, L, ...)
        self.steps = {"obs": [], "act": [], "rew": []}
        if self.adaptations >= self.config.max_adaptations:
            return  # nothing more to learn from this trial: keep no buffers
        self.episodes.append(ep)
        if len(self.episodes) == self.config.adapt_every:
            self._adapt()
            self.episodes = []
            self.adaptations += 1

    # ---- adaptation
    def _adapt(self) -> None:
        """The inner step(s) on this trial's last episodes, from the current (per-trial) parameters."""
        stack = lambda k: torch.stack([e[k] for e in self.episodes], dim=1)  # noqa: E731  (B, E, L, ...)
        obs, act, rew = stack("obs"), stack("act"), stack("rew")
        with torch.no_grad():
            logp = vmap(log_prob)(self.trial_params, obs, act)  # (B, E, L)
        rollout = Rollout(obs, obs.double(), act, logp, rew, torch.zeros(obs.shape[:2]))
        support = to_batch(rollout, advantages(rollout, self.config.gamma, self.config.gae_lambda))
        step = self.step_sizes if self.step_sizes is not None else self.config.inner_lr
        steps = self.config.inner_steps
        self.trial_params = vmap(lambda p, s: adapt(inner_loss, p, s, step, steps, first_order=True))(
            self.trial_params, support)
        self.trial_params = {k: v.detach() for k, v in self.trial_params.items()}

    def describe(self) -> dict:
        out = {"name": self.name, "type": type(self).__name__, "checkpoint": self.source,
               "learned_step_sizes": self.step_sizes is not None, **asdict(self.config)}
        config = Path(self.source) / "config.json" if self.source else None
        if config is not None and config.is_file():  # the report's "trained on" column
            meta = json.loads(config.read_text())
            pool = meta.get("config", {}).get("task_pool")
            if pool is not None:
                out["task_pool"] = f"train {pool}"
        budget = read_budget(self.source) if self.source else None  # the report's budget columns
        if budget is not None:
            out["budget"] = budget
        return out


def load_agent(path: str | Path, adaptive: bool = True, **overrides) -> GradientRLAgent:
    """The agent of a gradient meta-RL run directory (``icl-metarl train maml|meta-sgd|reptile|...``); ``adaptive=False`` never takes an inner step.

    ``overrides`` replace RLAgentConfig fields (e.g. ``deterministic=True``, ``max_adaptations=3``).
    """
    path = Path(path)
    params, steps, config, tensors = load_checkpoint(path, "`icl-metarl train maml` (or another gradient learner)")
    if config.get("model_type") != MODEL_TYPE:
        raise UsageError(f"checkpoint {str(path)!r} has model_type {config.get('model_type')!r}; "
                         f"valid: {MODEL_TYPE!r}")
    run = config["config"]
    norm = ObsNorm.from_state({k: tensors[f"obs_norm.{k}"] for k in ("mean", "var", "count")})
    settings = dict(adapt_every=run["adapt_episodes"], max_adaptations=1, inner_steps=run["inner_steps"],
                    inner_lr=run["inner_lr"], gamma=run["gamma"], gae_lambda=run["gae_lambda"])
    settings.update(overrides)
    if not adaptive:
        settings["max_adaptations"] = 0
    try:
        cfg = RLAgentConfig(**settings)
    except TypeError as e:
        raise UsageError(f"bad agent setting: {e}") from None
    label = f"{run['algo']}{'-imitate' if run.get('outer_loss') == 'imitate' else ''}-{path.name}"
    # a checkpoint written before the decision interval existed acted at every simulator step
    return GradientRLAgent(params, norm, cfg, steps, name=label, source=str(path),
                           action_repeat=int(run.get("action_repeat", 1)))
