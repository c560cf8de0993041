"""The in-context policy's token inputs made from played steps: the previous action and reward of every
step, and the inputs of whole episodes laid end to end (one token per timestep, DESIGN.md).

Not for: embedding the tokens (``model.py``) or the training target (``loss.py``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


def shift_previous(
    actions: torch.Tensor, rewards: torch.Tensor, episode_start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous step's action (B,T,A) and reward (B,T) at every step; zeros at episode starts.

    The first token of a sequence has no previous step in it, so it gets zeros too (windows start
    at an episode start, where zeros are right anyway).
    """
    prev_actions = F.pad(actions[:, :-1], (0, 0, 1, 0))  # (B, T, A)
    prev_rewards = F.pad(rewards[:, :-1], (1, 0))  # (B, T)
    keep = ~episode_start.bool()
    prev_actions = torch.where(rearrange(keep, "b t -> b t 1"), prev_actions, torch.zeros_like(prev_actions))
    prev_rewards = torch.where(keep, prev_rewards, torch.zeros_like(prev_rewards))
    return prev_actions, prev_rewards


def episode_inputs(obs, actions, rewards, device=None) -> dict[str, torch.Tensor]:
    """The model's inputs for whole played episodes laid end to end: obs (B,K,T,D), actions taken
    (B,K,T,A) and rewards (B,K,T) (arrays) -> obs, prev_actions, prev_rewards, episode_start and
    step_in_episode, each (B, K*T, ...)."""
    b, k, t = np.shape(rewards)
    flat = lambda x, pattern: torch.as_tensor(rearrange(np.asarray(x), pattern), dtype=torch.float32, device=device)
    actions = flat(actions, "b k t d -> b (k t) d")
    rewards = flat(rewards, "b k t -> b (k t)")
    step = torch.arange(t, device=device).repeat(k).expand(b, k * t)  # (B, K*T)
    start = step == 0
    prev_actions, prev_rewards = shift_previous(actions, rewards, start)
    return {"obs": flat(obs, "b k t d -> b (k t) d"), "prev_actions": prev_actions, "prev_rewards": prev_rewards,
            "episode_start": start, "step_in_episode": step}
