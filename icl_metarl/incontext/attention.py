"""Attention kernels and masks of the in-context policy: SDPA, eager (returns the weights, for probes),
flash-attn 2 (falls back to SDPA, said once), the causal mask after a cache and the compact context's mask.

Functions of tensors only; not for: the blocks that call them or the cache they read (``model.py``,
``kv_cache.py``).
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange

from icl_metarl.harness.errors import choice_error

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------ masks
def _causal_mask(t: int, s: int, device) -> torch.Tensor:
    """(T, S) bool, True where query i (absolute position S-T+i) may attend key j."""
    past = s - t
    return torch.arange(s, device=device)[None, :] <= (past + torch.arange(t, device=device))[:, None]


def kept_steps(length: int, stride: int) -> list[int]:
    """The steps of a finished episode of ``length`` steps that the compact context keeps: every
    ``stride``-th (steps stride-1, 2 stride-1, ...) and the last."""
    return [t for t in range(length) if (t + 1) % stride == 0 or t == length - 1]


def best_candidates(length: int, stride: int) -> list[int]:
    """The steps of a finished episode of ``length`` steps among which ``context_keep_best`` picks the ones more it
    keeps: those ``kept_steps`` drops, except step 0 (it reads no reward of the episode). Empty: it keeps none."""
    kept = set(kept_steps(length, stride))
    return [t for t in range(1, length) if t not in kept]


def best_steps(prev_rewards: torch.Tensor, stride: int, count: int = 1) -> torch.Tensor | None:
    """The extra steps a finished episode keeps under ``context_keep_best``: ``count`` of its steps that
    ``kept_steps`` does not keep (and not step 0, which reads no reward of the episode), those whose tokens read
    the highest previous rewards. Ties at the lowest reward kept are broken by spreading the picks evenly in time
    over the tied steps (first and last tied step, and between them); for ``count`` 1, the first of them.

    Why spread: Meta-World's reach, push and pick-place pay a flat maximum everywhere inside the goal's success
    region, so an episode that enters it has many decisions tied at the top; a spread of them spans the region,
    whose centre is the goal, where the first one of them only marks its edge (docs/ml10.md, session 33).
    Each token holds the observation its decision led to. ``prev_rewards`` (..., T), the tokens' previous-reward
    inputs of one episode; returns (..., n) long, ascending, n = min(count, candidates), or None when the
    episode has no candidate step or ``count`` is 0. Integer arithmetic on float32 rewards, so acting and
    training (stored rewards, observed ones) pick alike."""
    t = prev_rewards.shape[-1]
    steps = best_candidates(t, stride)
    n = min(count, len(steps))
    if n < 1:
        return None
    candidate = torch.zeros(t, dtype=torch.bool, device=prev_rewards.device)
    candidate[steps] = True
    r = prev_rewards.float().masked_fill(~candidate, float("-inf"))  # (..., T)
    lowest = r.topk(n, dim=-1).values[..., -1:]  # (..., 1): the lowest reward kept; finite (n <= candidates)
    above = r > lowest  # kept whatever the ties: fewer than n
    tied = r == lowest
    need = n - above.sum(-1, keepdim=True)  # (..., 1) >= 1 picks among the tied
    n_tied = tied.sum(-1, keepdim=True)  # (..., 1) >= need
    j = torch.arange(n, device=r.device)  # (n,)
    # the j-th of ``need`` picks is the tied step of rank round(j (n_tied - 1) / (need - 1)), in integers
    spread = (2 * j * (n_tied - 1) + (need - 1)) // (2 * (need - 1)).clamp(min=1)  # (..., n)
    rank = tied.long().cumsum(-1) - 1  # (..., T): the rank of each tied step in time
    picked = (rank[..., None, :] == spread[..., :, None]) & (j < need)[..., :, None] & tied[..., None, :]
    chosen = above | picked.any(-2)  # (..., T), n per row
    return chosen.long().sort(dim=-1, descending=True, stable=True).indices[..., :n].sort(-1).values


def kept_offsets(prev_rewards: torch.Tensor, stride: int, keep_best: int) -> torch.Tensor:
    """(B, n) long, ascending: the steps a finished episode keeps in the cache, per row. ``prev_rewards``
    (B, T): its tokens' previous-reward inputs. Every row keeps ``kept_steps``, and its ``keep_best``
    ``best_steps`` too (as many more in every row)."""
    b, t = prev_rewards.shape
    base = torch.as_tensor(kept_steps(t, stride), dtype=torch.long, device=prev_rewards.device).expand(b, -1)
    best = best_steps(prev_rewards, stride, keep_best)
    if best is None:
        return base
    return torch.cat([base, best], dim=1).sort(dim=1).values


def compact_mask(episode_index: torch.Tensor, step: torch.Tensor, stride: int,
                 prev_rewards: torch.Tensor | None = None, keep_best: int = 1) -> torch.Tensor:
    """(T, T) bool, True where token i may attend token j under the compact context: j <= i, and j in
    i's episode or a kept token (``kept_steps``) of an earlier one. ``episode_index`` and ``step`` (T,) lay
    out whole episodes end to end (the last token of the sequence ends its episode, or is in the episode
    of every later query). ``prev_rewards`` (B, T) (``context_keep_best``): each row's episodes also keep
    their ``keep_best`` ``best_steps``, and the mask is (B, T, T)."""
    t = step.shape[0]
    last = torch.ones(t, dtype=torch.bool, device=step.device)
    last[:-1] = episode_index[1:] != episode_index[:-1]
    kept = ((step + 1) % stride == 0) | last  # (T,)
    same = episode_index[:, None] == episode_index[None, :]  # (T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=step.device).tril()
    if prev_rewards is None:
        return causal & (same | kept[None, :])
    kept = kept.expand(prev_rewards.shape[0], t).clone()  # (B, T)
    ends = torch.nonzero(last).flatten().tolist()
    start = 0
    for end in ends:  # one episode at a time: a handful per trial
        best = best_steps(prev_rewards[:, start:end + 1], stride, keep_best)
        if best is not None:
            kept.scatter_(1, start + best, True)
        start = end + 1
    return causal & (same | kept[:, None, :])


# ---------------------------------------------------------------------------------------- kernels
def sdpa_attention(q, k, v, dropout_p: float, mask: torch.Tensor | None = None):
    """PyTorch's fused attention; q (B,nh,T,hs), k/v (B,nh,S,hs) -> (B,nh,T,hs), no weights. ``mask``
    (T,S) bool replaces the causal mask (the compact context's)."""
    t, s = q.shape[2], k.shape[2]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
    if t == 1:  # one new token sees everything cached
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p), None
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True), None
    # is_causal aligns the mask top-left; several new tokens after a cache need it bottom-right.
    mask = _causal_mask(t, s, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None


def eager_attention(q, k, v, dropout_p: float, mask: torch.Tensor | None = None):
    """Attention written out, returning the weights (B,nh,T,S) for probes."""
    t, s = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    scores = scores.masked_fill(~(_causal_mask(t, s, q.device) if mask is None else mask), float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype)
    return F.dropout(weights, dropout_p) @ v, weights


def flash_attention(q, k, v, dropout_p: float, mask: torch.Tensor | None = None):
    """flash-attn 2 on CUDA in fp16/bf16; anything else goes to SDPA (said once)."""
    if mask is not None:
        _warn_once("flash_attention_2 has no arbitrary mask (the compact context needs one); using sdpa")
        return sdpa_attention(q, k, v, dropout_p, mask)
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        _warn_once(f"flash_attention_2 needs CUDA and fp16/bf16 (got {q.device.type}, {q.dtype}); using sdpa")
        return sdpa_attention(q, k, v, dropout_p)
    from flash_attn import flash_attn_func  # optional dependency (CUDA only): imported where it is used

    # flash-attn wants (B, T, nh, hs); its causal mask is bottom-right aligned, as a cache needs.
    q, k, v = (rearrange(x, "b h t d -> b t h d") for x in (q, k, v))
    y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
    return rearrange(y, "b t h d -> b h t d"), None


ATTENTION_FUNCTIONS = {"sdpa": sdpa_attention, "eager": eager_attention, "flash_attention_2": flash_attention}


def resolve_attn_implementation(requested: str) -> str:
    """The implementation that will run: flash_attention_2 without flash-attn or CUDA becomes sdpa."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise choice_error("attn_implementation", requested, ATTN_IMPLEMENTATIONS)
    if requested == "flash_attention_2":
        missing = [w for w, ok in (("the flash-attn package", importlib.util.find_spec("flash_attn") is not None),
                                   ("CUDA", torch.cuda.is_available())) if not ok]
        if missing:
            _warn_once(f"attn_implementation='flash_attention_2' needs {' and '.join(missing)}; using 'sdpa'")
            return "sdpa"
    return requested

