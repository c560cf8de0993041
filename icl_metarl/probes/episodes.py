"""Played episodes of a batch of trials as arrays (B, K, T, ...): the rollout hook that records them and
the model's token inputs made from them.

Not for: changing them (``interventions.py``) or what is measured on them (``probe.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from icl_metarl.harness.rollout import StepHook
from icl_metarl.incontext.tokens import episode_inputs


@dataclass
class Episodes:
    """Played episodes of B trials, all of one length T: arrays (B, K, T, ...)."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    success: np.ndarray

    @property
    def count(self) -> int:
        return self.obs.shape[1]

    @classmethod
    def empty(cls, b: int, k: int, t: int, obs_dim: int, act_dim: int) -> "Episodes":
        return cls(np.zeros((b, k, t, obs_dim), np.float32), np.zeros((b, k, t, act_dim), np.float32),
                   np.zeros((b, k, t), np.float32), np.zeros((b, k, t), np.float32))

    def take(self, sl: slice) -> "Episodes":
        return Episodes(self.obs[:, sl], self.actions[:, sl], self.rewards[:, sl], self.success[:, sl])

    def join(self, other: "Episodes") -> "Episodes":
        return Episodes(*(np.concatenate([a, b], axis=1) for a, b in
                          ((self.obs, other.obs), (self.actions, other.actions),
                           (self.rewards, other.rewards), (self.success, other.success))))


def model_inputs(ep: Episodes, device=None) -> dict[str, torch.Tensor]:
    """The model's token inputs for episodes laid end to end: each (B, K*T, ...)."""
    return episode_inputs(ep.obs, ep.actions, ep.rewards, device)


def recorder(into: Episodes) -> StepHook:
    """An ``on_step`` hook of the rollout loop writing every step into ``into`` (B,K,T,...) at its
    episode and step: the observation acted on, the action taken (exploration included), the outcome."""

    def on_step(episode, t, obs, info, actions, reward, success) -> None:
        into.obs[:, episode, t], into.actions[:, episode, t] = obs, actions
        into.rewards[:, episode, t], into.success[:, episode, t] = reward, success

    return on_step
