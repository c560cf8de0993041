"""Statistics of an attention map: where each query's attention goes (episode lag, high-reward and
success keys, episode starts) and how spread it is, averaged over chosen queries.

Pure functions of tensors, tested on hand-made maps; not for: running a model (``probe.py``).
"""

from __future__ import annotations

import torch
from einops import rearrange


def lag_shares(attn: torch.Tensor, key_episode: torch.Tensor, query_episode: torch.Tensor, n_lags: int) -> torch.Tensor:
    """Share of each query's attention on keys 0, 1, ..., n_lags-1 episodes back (lags beyond pooled
    into the last): attn (B,H,T,S), key_episode (B,S), query_episode (B,T) -> (B,H,T,n_lags).

    Keys after the query's episode (none under a causal mask) count nowhere, so the shares of a causal
    row sum to its total attention, 1.
    """
    lag = rearrange(query_episode, "b t -> b t 1") - rearrange(key_episode, "b s -> b 1 s")  # (B, T, S)
    valid = lag >= 0
    lag = lag.clamp(0, n_lags - 1)
    shares = [(attn * rearrange(valid & (lag == k), "b t s -> b 1 t s")).sum(-1) for k in range(n_lags)]
    return torch.stack(shares, dim=-1)  # (B, H, T, n_lags)


def key_mass(attn: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention of each query on the keys where ``key_mask`` (B,T,S) or (B,S) is true: (B,H,T)."""
    if key_mask.dim() == 2:
        key_mask = rearrange(key_mask, "b s -> b 1 s")
    return (attn * rearrange(key_mask.to(attn.dtype), "b t s -> b 1 t s")).sum(-1)


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each query's attention row (B,H,T,S) -> (B,H,T); 0 log 0 = 0."""
    return torch.special.entr(attn).sum(-1)


def query_mean(x: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the queries where ``query_mask`` (B,T) is true: x (B,H,T,...) -> (B,H,...)."""
    w = query_mask.to(x.dtype)
    w = w / w.sum(-1, keepdim=True).clamp(min=1)
    w = w.reshape(w.shape[0], 1, w.shape[1], *([1] * (x.dim() - 3)))
    return (x * w).sum(2)


def high_reward_keys(rewards: torch.Tensor, candidates: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per trial, the candidate tokens whose reward is at least the ``quantile`` of the candidates'
    rewards and above their minimum (so constant rewards mark nothing): (B,S) bool."""
    out = torch.zeros_like(candidates)
    for b in range(rewards.shape[0]):
        r = rewards[b][candidates[b]]
        if r.numel() == 0:
            continue
        cut = torch.quantile(r.double(), quantile).to(rewards.dtype)
        out[b] = candidates[b] & (rewards[b] >= cut) & (rewards[b] > r.min())
    return out


def attention_statistics(
    attn: torch.Tensor,
    key_episode: torch.Tensor,
    key_reward: torch.Tensor,
    key_success: torch.Tensor,
    key_start: torch.Tensor,
    query_mask: torch.Tensor,
    n_lags: int,
    high_reward_quantile: float = 0.9,
) -> dict[str, torch.Tensor]:
    """Statistics of one layer's attention (B,H,T,S), T = S = the same tokens, averaged over the
    queries of ``query_mask`` (B,T): a dict of (B,H) or (B,H,n_lags) tensors, NaN where undefined.

    Keys are labelled by what their token carries: its episode, the previous step's reward and success
    (the outcome that led to the token's observation) and whether it starts an episode. "Earlier"
    means an episode before the query's; shares on reward/success keys are of the attention that goes
    to earlier episodes, next to those keys' share of the earlier tokens (enrichment 1 = no preference).
    """
    q_ep = key_episode[:, -attn.shape[2]:]  # (B, T): queries are the last T tokens
    earlier = rearrange(key_episode, "b s -> b 1 s") < rearrange(q_ep, "b t -> b t 1")  # (B, T, S)
    high = high_reward_keys(key_reward, key_episode < rearrange(q_ep.max(-1).values, "b -> b 1"), high_reward_quantile)
    succ = key_success.bool()
    shares = lag_shares(attn, key_episode, q_ep, n_lags)  # (B, H, T, L)
    earlier_mass = key_mass(attn, earlier)  # (B, H, T)
    n_earlier = earlier.sum(-1).to(attn.dtype)  # (B, T)
    s = attn.shape[-1]
    out = {
        "episode_share": query_mean(shares, query_mask),
        "earlier_episodes_share": query_mean(earlier_mass, query_mask),
        "start_share": query_mean(key_mass(attn, key_start.bool()), query_mask),
        "start_tokens": query_mean(rearrange(_row_share(key_start.bool(), q_ep, key_episode, s), "b t -> b 1 t"), query_mask),
        "entropy": query_mean(attention_entropy(attn), query_mask),
        "entropy_normalised": query_mean(attention_entropy(attn) / _log_keys(attn), query_mask),
    }
    for name, mask in (("high_reward", high), ("success", succ)):
        on = key_mass(attn, earlier & rearrange(mask, "b s -> b 1 s"))  # (B, H, T)
        tokens = (earlier & rearrange(mask, "b s -> b 1 s")).sum(-1).to(attn.dtype) / n_earlier.clamp(min=1)
        att = query_mean(on / earlier_mass.clamp(min=1e-12), query_mask)  # (B, H)
        tok = query_mean(rearrange(tokens, "b t -> b 1 t"), query_mask)  # (B, 1)
        undefined = rearrange(tok[:, 0] == 0, "b -> b 1")  # no such tokens in this trial's context
        out[f"{name}_share"] = att.masked_fill(undefined, float("nan"))
        out[f"{name}_tokens"] = tok.expand_as(att).masked_fill(undefined, float("nan"))
    return out


def _row_share(key_mask: torch.Tensor, q_ep: torch.Tensor, key_episode: torch.Tensor, s: int) -> torch.Tensor:
    """Share of the keys visible to each query (causal: the first t+1 of the last T) in ``key_mask``: (B,T)."""
    t = q_ep.shape[1]
    visible = torch.arange(s, device=key_mask.device)[None, :] <= torch.arange(s - t, s, device=key_mask.device)[:, None]
    return (visible[None] & rearrange(key_mask, "b s -> b 1 s")).sum(-1) / visible.sum(-1)[None]


def _log_keys(attn: torch.Tensor) -> torch.Tensor:
    """log(number of keys a causal query sees), at least log 2 so a first token divides by something."""
    t, s = attn.shape[2], attn.shape[3]
    n = torch.arange(s - t + 1, s + 1, device=attn.device, dtype=attn.dtype)
    return n.clamp(min=2).log()  # (T,)
