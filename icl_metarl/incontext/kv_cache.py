"""The in-context policy's KV cache: keys and values of every layer, preallocated once, so a rollout
step writes one slot per layer; it also forgets a finished episode's steps for the compact context.

Not for: what attends to it (``attention.py``) or when the agent resets or trims it (``agent.py``).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, preallocated once: (L, B, nh, capacity, hs); ``length`` filled.

    Static so that a rollout step writes one slot per layer instead of concatenating a growing tensor.
    The model's forward writes into it in place and advances ``length``.
    """

    def __init__(self, n_layer, batch, n_head, head_dim, capacity, device=None, dtype=torch.float32):
        self.keys = torch.zeros(n_layer, batch, n_head, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.layer_keys, self.layer_values = tuple(self.keys), tuple(self.values)  # per-layer views, made once
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        """Forget every token; the memory stays allocated for the next trial."""
        self.length = 0

    def keep(self, start: int, offsets) -> None:
        """Keep, of the tokens from ``start`` on, only those at ``offsets`` (ascending, relative to
        ``start``), moved up to follow the tokens before ``start``: how the compact context forgets a
        finished episode's other steps. The kept keys and values are the ones computed when the episode
        was current, exactly what training's compact mask gives them. ``offsets``: a list shared by the
        batch, or a (B, n) tensor, each row's own (as many per row)."""
        index = torch.as_tensor(offsets, dtype=torch.long, device=self.keys.device) + start
        end = start + index.shape[-1]
        if index.dim() == 1:
            self.keys[:, :, :, start:end] = self.keys.index_select(3, index)
            self.values[:, :, :, start:end] = self.values.index_select(3, index)
        else:  # (B, n): gather each row's own steps
            n_layer, _, n_head, _, head_dim = self.keys.shape
            index = index[None, :, None, :, None].expand(n_layer, -1, n_head, -1, head_dim)
            self.keys[:, :, :, start:end] = self.keys.gather(3, index)
            self.values[:, :, :, start:end] = self.values.gather(3, index)
        self.length = end

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k, v (B,nh,T,hs) after the cached tokens; return all (B,nh,S,hs)."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

