"""Policy-gradient pieces of gradient meta-RL: a sampler over trial environments, returns/GAE, losses.

The sampler plays a meta-batch of trials through the harness's rollout loop on one reused
``make_trial_envs`` vector environment, each trial with its own parameters (leading task axis) or all
with the same ones. Returns, advantages
and losses are pure functions of tensors. Not for: the meta-training loop (``meta_rl.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import einops
import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from gradient_meta.policy import Params, baseline_features, entropy, fit_linear_baseline, log_prob, policy_mean
from icl_metarl.harness.agent import Agent
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import OBS_DIM, GoalOffsets, TaskSpec, expert_actions, make_trial_envs, metaworld_task

OBS_CLIP = 10.0


# ------------------------------------------------------------------------------ observation norm
@dataclass
class ObsNorm:
    """Running mean and variance of raw observations (Chan et al. parallel update); frozen when used."""

    mean: Tensor = field(default_factory=lambda: torch.zeros(OBS_DIM, dtype=torch.float64))
    var: Tensor = field(default_factory=lambda: torch.ones(OBS_DIM, dtype=torch.float64))
    count: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    def __call__(self, obs: np.ndarray | Tensor) -> Tensor:
        """Normalised, clipped float32 observations of the same shape."""
        x = torch.as_tensor(obs, dtype=torch.float64)
        # Constant slots (the hidden goal is always 0) have variance 0; the floor keeps them at 0.
        z = (x - self.mean) / torch.sqrt(self.var + 1e-8)
        return z.clamp(-OBS_CLIP, OBS_CLIP).float()

    def update(self, count: Tensor, mean: Tensor, var: Tensor) -> None:
        """Merge the moments of a new batch (count, mean (D,), population var (D,)) into the running ones."""
        self.count, self.mean, self.var = merge_moments(self.count, self.mean, self.var, count, mean, var)

    def state(self) -> dict[str, Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    @staticmethod
    def from_state(d: dict[str, Tensor]) -> "ObsNorm":
        return ObsNorm(d["mean"].double().clone(), d["var"].double().clone(), d["count"].double().clone())


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, population variance) of the rows of ``x`` (N, D), in float64."""
    x = x.double()
    return torch.tensor(float(x.shape[0]), dtype=torch.float64), x.mean(0), x.var(0, unbiased=False)


def merge_moments(n_a: Tensor, mean_a: Tensor, var_a: Tensor, n_b: Tensor, mean_b: Tensor, var_b: Tensor):
    """Moments of the union of two samples from the moments of each (Chan, Golub & LeVeque 1979)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    m2 = var_a * n_a + var_b * n_b + delta**2 * n_a * n_b / n
    return n, mean, m2 / n


# ------------------------------------------------------------------------------------ sampler
@dataclass
class Rollout:
    """Episodes of a meta-batch of trials; leading axes (T tasks, E episodes, L decisions: steps at interval 1)."""

    obs: Tensor
    """(T, E, L, 39) normalised observations the policy saw."""
    raw_obs: Tensor
    """(T, E, L, 39) raw observations, for the running normaliser."""
    act: Tensor
    """(T, E, L, 4) actions taken (before the environment's clipping)."""
    logp: Tensor
    """(T, E, L) log-probability of each action under the sampling policy."""
    rew: Tensor
    """(T, E, L) rewards (each decision's: summed over the simulator steps its action was held)."""
    success: Tensor
    """(T, E) 1.0 where the episode succeeded at any step."""
    expert: Tensor | None = None
    """(T, E, L, 4) the scripted expert's action (told the goal) at each observation, if it was asked;
    the policy acted without it"""

    @property
    def steps(self) -> int:
        """Decisions played, the policy's steps (the simulator's: ``simulator_steps``)."""
        return int(self.rew.numel())

    def simulator_steps(self, episode_length: int) -> int:
        """Simulator steps played: every episode lasts ``episode_length`` of them, whatever the interval."""
        return int(self.rew.shape[0] * self.rew.shape[1]) * episode_length


def set_tasks(envs, tasks: Sequence[TaskSpec]) -> None:
    """Switch the trials of a sync ``make_trial_envs`` vector env to new tasks of the same environments.

    Building Meta-World environments costs ~0.2 s each, as much as 300 steps; a meta-batch reuses
    them. Reaches into ``TrialEnv`` (``task``, ``_env``), which keeps no other per-task state.
    """
    subs = envs.envs
    if len(subs) != len(tasks):
        raise ValueError(f"{len(tasks)} tasks for {len(subs)} environments")
    for sub, task in zip(subs, tasks):
        if sub.task.env_name != task.env_name:
            raise ValueError(f"cannot switch a {sub.task.env_name} trial to a {task.env_name} task")
        sub._env.set_task(metaworld_task(task))
        sub._env.max_path_length = sub.episode_length
        sub.task = task


class GaussianAgent(Agent):
    """The sampler's player: the Gaussian MLP acting ``mean + std * noise`` (noise from the caller's
    generator), with per-task (T, ...) or shared parameters; it keeps every step for ``rollout``."""

    name = "gaussian-mlp"

    def __init__(self, params: Params, norm: ObsNorm, generator: torch.Generator, per_task: bool,
                 deterministic: bool = False, label_expert: bool = False, goal_offsets: GoalOffsets | None = None):
        self.goal_offsets = goal_offsets  # the labelling expert's corrections (suites.parse_goal_offsets)
        self.params = {k: v.detach() for k, v in params.items()}
        self.std = torch.exp(self.params["log_std"])  # (A,) or (T, A)
        self.norm, self.generator, self.per_task, self.deterministic = norm, generator, per_task, deterministic
        self.mean_fn = vmap(policy_mean) if per_task else policy_mean
        # Labelling needs the true goals, which only privileged agents are handed; the policy never sees them.
        self.label_expert = self.privileged = label_expert
        self._clear()

    def _clear(self) -> None:
        self.episodes: list[dict[str, Tensor]] = []
        self.steps: dict[str, list[Tensor]] = {"obs": [], "raw_obs": [], "act": [], "rew": [], "success": []}
        if self.label_expert:
            self.steps["expert"] = []

    def start_trials(self, num_trials: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))
        self._clear()

    def act(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = self.norm(obs)  # (T, 39)
            mean = self.mean_fn(self.params, x)  # (T, A)
            act = mean if self.deterministic else \
                mean + self.std * torch.randn(mean.shape, generator=self.generator)
        self.steps["raw_obs"].append(torch.tensor(obs, dtype=torch.float64))
        self.steps["obs"].append(x)
        self.steps["act"].append(act)
        return act.numpy()

    def act_privileged(self, obs: np.ndarray, privileged) -> np.ndarray:
        """``act`` on the observation alone; the expert's action there (told the goal) is only recorded."""
        label = expert_actions(privileged.env_names, obs, privileged.goals, self.goal_offsets)
        self.steps["expert"].append(torch.as_tensor(label))
        return self.act(obs)

    def observe(self, reward: np.ndarray, success: np.ndarray) -> None:
        self.steps["rew"].append(torch.as_tensor(reward, dtype=torch.float32))
        self.steps["success"].append(torch.as_tensor(success, dtype=torch.float32))

    def end_episode(self) -> None:
        self.episodes.append({k: torch.stack(v, dim=1) for k, v in self.steps.items()})  # (T, L, ...)
        self.steps = {k: [] for k in self.steps}

    def rollout(self) -> Rollout:
        """The episodes played since the agent was made (or started)."""
        ep = {k: torch.stack([e[k] for e in self.episodes], dim=1) for k in self.steps}  # (T, E, L, ...)
        with torch.no_grad():
            logp = rollout_log_prob(self.params, ep["obs"], ep["act"], self.per_task)
        return Rollout(ep["obs"], ep["raw_obs"], ep["act"], logp, ep["rew"], ep["success"].amax(dim=-1),
                       ep.get("expert"))


class Sampler:
    """Plays a meta-batch of trials on one vector environment, reused across meta-batches; the policy acts
    every ``action_repeat`` simulator steps of an ``episode_length``-step episode (its rollouts' L are decisions)."""

    def __init__(self, tasks: Sequence[TaskSpec], episode_length: int, seed: int = 0, action_repeat: int = 1):
        self.episode_length, self.seed, self.action_repeat = episode_length, seed, action_repeat
        self.envs = make_trial_envs(list(tasks), episode_length, seed, mode="sync", action_repeat=action_repeat)
        self.tasks = list(tasks)

    def set_tasks(self, tasks: Sequence[TaskSpec]) -> None:
        if [t.env_name for t in tasks] == [t.env_name for t in self.tasks]:
            set_tasks(self.envs, tasks)
        else:  # a different mix of environments (ML10/ML45): rebuild
            self.envs.close()
            self.envs = make_trial_envs(list(tasks), self.episode_length, self.seed, mode="sync",
                                        action_repeat=self.action_repeat)
        self.tasks = list(tasks)

    def close(self) -> None:
        self.envs.close()

    def sample(self, params: Params, norm: ObsNorm, episodes: int, generator: torch.Generator,
               per_task: bool, deterministic: bool = False, label_expert: bool = False,
               goal_offsets: GoalOffsets | None = None) -> Rollout:
        """``episodes`` episodes of every trial; ``per_task`` params carry a leading task axis (T, ...);
        ``label_expert``: also record the scripted expert's action at every observation the policy acts on
        (each decision: ``Rollout.expert``)."""
        agent = GaussianAgent(params, norm, generator, per_task, deterministic, label_expert, goal_offsets)
        # The agent draws from meta-training's generator, which runs on across calls: not restarted.
        # Torch's threads are the command's (one for meta-training: the gradient learners' registration).
        for _ in play_trials(agent, self.tasks, self.seed, 0, episodes, 0, self.episode_length,
                             envs=self.envs, start_trials=False, action_repeat=self.action_repeat):
            pass
        return agent.rollout()


def rollout_log_prob(params: Params, obs: Tensor, act: Tensor, per_task: bool) -> Tensor:
    """log pi(act | obs) for (T, E, L, .) rollouts; (T, E, L)."""
    if per_task:
        return vmap(log_prob)(params, obs, act)
    return log_prob(params, obs, act)


# ------------------------------------------------------------------------------- returns / GAE
def discounted_returns(rew: Tensor, gamma: float) -> Tensor:
    """Reward-to-go sum_k gamma^k r_{t+k} along the last axis (episodes end at the last step)."""
    out = torch.zeros_like(rew)
    running = torch.zeros_like(rew[..., 0])
    for t in range(rew.shape[-1] - 1, -1, -1):
        running = rew[..., t] + gamma * running
        out[..., t] = running
    return out


def gae(rew: Tensor, values: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates (Schulman et al. 2016, eq. 16) along the last axis.

    ``values`` (..., L) are the baseline at each step; the value after the last step is 0 (the episode
    ends, as in MAML-RL, whose time features let the baseline learn the truncation).
    """
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    delta = rew + gamma * next_values - values
    return discounted_returns(delta, gamma * lam)


def advantages(rollout: Rollout, gamma: float, lam: float, reward_scale: float = 1.0) -> Tensor:
    """Per-task GAE with a linear baseline fitted on that task's own episodes, normalised per task: (T, E, L).

    Fitting the baseline per task on the same episodes follows MAML-RL (Finn et al. 2017); normalising
    per task keeps the inner step's size independent of the reward scale.
    """
    rew = rollout.rew * reward_scale
    t_count, e_count, length = rew.shape
    returns = discounted_returns(rew, gamma)  # (T, E, L)
    step = einops.repeat(torch.arange(length, dtype=torch.float32) / 100.0, "l -> t e l", t=t_count, e=e_count)
    feats = baseline_features(rollout.obs, step)  # (T, E, L, F)
    flat = einops.rearrange(feats, "t e l f -> t (e l) f")
    weights = torch.stack([fit_linear_baseline(flat[i], returns[i].reshape(-1)) for i in range(t_count)])
    values = torch.einsum("telf,tf->tel", feats, weights)
    adv = gae(rew, values, gamma, lam)
    mu = adv.mean(dim=(1, 2), keepdim=True)
    sd = adv.std(dim=(1, 2), keepdim=True)
    return (adv - mu) / (sd + 1e-8)


def to_batch(rollout: Rollout, adv: Tensor) -> dict[str, Tensor]:
    """The per-task batch a loss reads: every leaf (T, N) with N = episodes * steps."""
    flat = lambda x: einops.rearrange(x, "t e l ... -> t (e l) ...")  # noqa: E731
    batch = {"obs": flat(rollout.obs), "act": flat(rollout.act), "logp": flat(rollout.logp), "adv": flat(adv).detach()}
    if rollout.expert is not None:
        batch["expert"] = flat(rollout.expert)
    return batch


# --------------------------------------------------------------------------------------- losses
def inner_loss(params: Params, batch: dict[str, Tensor]) -> Tensor:
    """REINFORCE with a baseline on one task's episodes, written as a likelihood ratio to the sampler.

    At the sampling parameters its gradient is REINFORCE's, -mean(grad log pi * A); its Hessian is the
    low-variance curvature estimate of ProMP (Rothfuss et al. 2019, eq. 13), and further inner steps
    on the same episodes are importance-weighted.
    """
    ratio = torch.exp(log_prob(params, batch["obs"], batch["act"]) - batch["logp"])
    return -(ratio * batch["adv"]).mean()


def make_outer_loss(clip: float = 0.2, entropy_coef: float = 0.0):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) on one task's post-adaptation episodes."""
    def outer_loss(params: Params, batch: dict[str, Tensor]) -> Tensor:
        ratio = torch.exp(log_prob(params, batch["obs"], batch["act"]) - batch["logp"])
        adv = batch["adv"]
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
        return -surrogate.mean() - entropy_coef * entropy(params)

    return outer_loss


def make_imitation_loss():
    """Guided Meta-Policy Search's outer loss (Mendonca et al. 2019): the negative log-likelihood of the
    scripted expert's action under the adapted policy, on the states that policy visited (DAgger-style
    labels, as the in-context agent's relabelling rounds). Reads ``batch["expert"]``; only the outer loss
    does, the inner step (``inner_loss``) learns from reward alone."""
    def imitation_loss(params: Params, batch: dict[str, Tensor]) -> Tensor:
        return -log_prob(params, batch["obs"], batch["expert"]).mean()

    return imitation_loss
