"""A Gaussian MLP policy and a linear value baseline for Meta-World, as pure functions of parameter dicts.

The policy maps a (normalised) observation (39) to a diagonal Gaussian over the 4 actions; the
environment clips actions to [-1, 1]. Everything is a function of ``params``, so ``torch.func.grad``
and ``vmap`` (one parameter set per task) apply directly. Not for: sampling environments (``rl.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.suites import ACT_DIM, OBS_DIM

Params = dict[str, Tensor]


@dataclass
class PolicyConfig:
    """Shape of the Gaussian MLP policy."""

    obs_dim: int = OBS_DIM
    """Observation size (Meta-World: 39)."""
    act_dim: int = ACT_DIM
    """Action size (Meta-World: 4)."""
    hidden: tuple[int, ...] = (64, 64)
    """Widths of the tanh hidden layers."""
    init_std: float = 0.5
    """Initial standard deviation of every action dimension (a learned, state-independent log-std)."""

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.hidden or min(self.hidden) < 1:
            raise UsageError(f"policy hidden widths must be positive integers, got {self.hidden!r}")
        if not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise UsageError(f"policy init_std must be a finite number > 0, got {self.init_std!r}")


def init_policy(config: PolicyConfig, generator: torch.Generator | None = None) -> Params:
    """Fresh parameters: orthogonal-ish scaled-normal layers, a small last layer so actions start near 0."""
    sizes = (config.obs_dim, *config.hidden, config.act_dim)
    params: Params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        # A small final layer keeps the initial mean near zero, so exploration comes from the std.
        scale = (0.01 if last else 1.0) / math.sqrt(n_in)
        params[f"layer{i}.weight"] = torch.randn(n_out, n_in, generator=generator) * scale
        params[f"layer{i}.bias"] = torch.zeros(n_out)
    params["log_std"] = torch.full((config.act_dim,), math.log(config.init_std))
    return params


def num_layers(params: Params) -> int:
    return sum(1 for k in params if k.endswith(".weight"))


def policy_mean(params: Params, obs: Tensor) -> Tensor:
    """Mean action (..., act_dim) for observations (..., obs_dim)."""
    h = obs
    n = num_layers(params)
    for i in range(n):
        h = h @ params[f"layer{i}.weight"].T + params[f"layer{i}.bias"]
        if i < n - 1:
            h = torch.tanh(h)
    return h


def log_prob(params: Params, obs: Tensor, act: Tensor) -> Tensor:
    """log pi(act | obs) of the diagonal Gaussian, summed over action dimensions: (...,)."""
    mean = policy_mean(params, obs)
    log_std = params["log_std"]
    z = (act - mean) * torch.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def entropy(params: Params) -> Tensor:
    """Entropy of the (state-independent) action distribution."""
    return (params["log_std"] + 0.5 * math.log(2 * math.pi * math.e)).sum()


def sample_action(params: Params, obs: Tensor, generator: torch.Generator | None = None,
                  deterministic: bool = False) -> Tensor:
    """An action (..., act_dim): the mean, or a draw from the Gaussian (unclipped; the env clips)."""
    mean = policy_mean(params, obs)
    if deterministic:
        return mean
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return mean + torch.exp(params["log_std"]) * noise


# ---------------------------------------------------------------------------------------- baseline
def baseline_features(obs: Tensor, step: Tensor) -> Tensor:
    """Features of the linear baseline of Duan et al. 2016 (used by MAML-RL): obs, obs^2, t, t^2, t^3, 1.

    ``obs`` (..., D), ``step`` (...,) the step in the episode divided by a fixed scale; (..., 2D + 4).
    """
    obs = obs.clamp(-10, 10)
    t = step[..., None]
    return torch.cat([obs, obs**2, t, t**2, t**3, torch.ones_like(t)], dim=-1)


def fit_linear_baseline(features: Tensor, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Ridge-regression weights (F,) mapping features (N, F) to returns (N,), as in rllab's baseline."""
    f = features.double()
    a = f.T @ f
    b = f.T @ returns.double()
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    # Grow the ridge until the solve is finite (constant features, e.g. the hidden goal, are singular).
    for k in range(6):
        w = torch.linalg.solve(a + reg * 10**k * eye, b)
        if torch.isfinite(w).all():
            break
    return w.to(features.dtype)


def predict_baseline(weights: Tensor, features: Tensor) -> Tensor:
    """Baseline value (...,) for features (..., F)."""
    return features @ weights
