"""What the causal probes change: context interventions (functions from the earlier episodes to other
earlier episodes, by name) and the ablation of one attention head. A new context intervention is a
function here, named in ``INTERVENTIONS`` and in ``config.CONTEXT_CONDITIONS``.

Not for: replaying the probed episode after them, or summarising the effect (``probe.py``).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from icl_metarl.harness.errors import UsageError
from icl_metarl.probes.episodes import Episodes


def shuffle_rewards(ep: Episodes, rng: np.random.Generator) -> Episodes:
    """Each episode's rewards permuted across its steps: the same rewards, no longer tied to states."""
    rewards = rng.permuted(ep.rewards, axis=2)
    return Episodes(ep.obs, ep.actions, rewards, ep.success)


def zero_rewards(ep: Episodes, rng: np.random.Generator) -> Episodes:
    return Episodes(ep.obs, ep.actions, np.zeros_like(ep.rewards), ep.success)


def remove_episodes(ep: Episodes, rng: np.random.Generator) -> Episodes:
    return ep.take(slice(0, 0))


INTERVENTIONS: dict[str, Callable[[Episodes, np.random.Generator], Episodes]] = {
    "shuffle_rewards": shuffle_rewards, "zero_rewards": zero_rewards, "remove_episodes": remove_episodes,
}


@contextlib.contextmanager
def ablated_head(model, layer: int, head: int):
    """Zero one head's output while inside: its columns of the attention output projection are zeroed
    in place (not a forward hook), so every path through the weights sees it, the agent's one-token
    ``decode_step`` included; restored on exit."""
    c = model.config
    if not (0 <= layer < c.n_layer and 0 <= head < c.n_head):
        raise UsageError(f"head ({layer}, {head}) outside the model's {c.n_layer} layers x {c.n_head} heads")
    hs = c.d_model // c.n_head
    weight = model.blocks[layer].attn.proj.weight  # (d, nh*hs): its input has the heads laid out head-major
    cols = slice(head * hs, (head + 1) * hs)
    with torch.no_grad():
        saved = weight[:, cols].clone()
        weight[:, cols] = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            weight[:, cols] = saved
