"""The in-context policy: a causal Transformer over one token per timestep that predicts the action.

A ``transformers`` config/model pair (``save_pretrained`` / ``from_pretrained`` give a directory with
``config.json`` and ``model.safetensors``). Not for: rollouts (``icl_agent.py``) or training loops.

Why the backbone is written here and not taken from ``transformers``: the agent runs one new token per
step for a batch of trials, so per-step latency bounds the rollout speed; nanoGPT-style blocks with a
preallocated static KV cache and SDPA step faster than the library's Llama and GPT-2 models with their
dynamic caches (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import atomic_write_bytes, atomic_write_text, read_json
from icl_metarl.incontext.config import MODEL_TYPE, TARGETS

ACTION_HEADS = ("deterministic", "tanh_gaussian")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LOG_STD_RANGE = (-5.0, 2.0)
# Expert actions saturate at exactly +-1 (clipped); atanh needs them strictly inside, so the
# tanh-Gaussian likelihood reads them at +-(1 - ATANH_EPS), i.e. atanh = +-3.8.
ATANH_EPS = 1e-3

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------------------------- config
class ICLPolicyConfig(PretrainedConfig):
    """Shape and behaviour of the in-context policy; the defaults (d=64, 3 layers, 4 heads, 0.32M parameters at
    500-step episodes) are the size every measured CPU recipe used (docs/results.md); GPU configs set larger.

    Args:
        obs_dim: observation size (Meta-World: 39).
        act_dim: action size (Meta-World: 4).
        d_model: width of the token embedding and of every layer.
        n_layer: number of Transformer blocks.
        n_head: attention heads per block (must divide d_model).
        max_episode_length: size of the step-in-episode embedding; longer episodes are an error.
        max_context_episodes: the trained context, in whole episodes; positions = this x max_episode_length.
        action_head: "deterministic" (tanh of a linear map, MSE loss) or "tanh_gaussian" (NLL loss).
        reward_scale: previous rewards are multiplied by this before embedding (reach rewards reach 10).
        dropout: dropout on embeddings, attention and residuals during training.
        attn_implementation: "sdpa", "eager" (returns attention weights) or "flash_attention_2".
        explore_episodes: acting default of the in-context agent: in the first this many episodes of a
            trial, every trial adds a constant random offset to its actions (one draw per trial and
            episode), so its early episodes go to different places; the context then holds the rewards of
            places a posterior-mean policy would never visit. 0: no exploration.
        explore_scale: standard deviation of that offset, in action units (actions lie in [-1, 1]).
        context_stride: what the policy reads of earlier episodes. 0: every token of the last
            ``max_context_episodes`` episodes, with absolute positions (the ML1 recipes). s >= 1: the compact
            cross-episode context: the current episode in full and each earlier episode of the trial by
            its tokens at steps s-1, 2s-1, ... and its last step (which has read its whole episode: a
            summary of it); positions are then the step in the episode and the episode's index in the
            trial, of which ``max_context_episodes`` are embedded (later ones share the last). Training
            reads whole trials under this mask, so every token trains on exactly the context it acts on.
        action_repeat: the decision interval the policy was trained at (it acts every k-th simulator
            step, the action held in between); an evaluation at another interval is refused.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        obs_dim: int = 39,
        act_dim: int = 4,
        d_model: int = 64,
        n_layer: int = 3,
        n_head: int = 4,
        max_episode_length: int = 500,
        max_context_episodes: int = 4,
        action_head: str = "deterministic",
        reward_scale: float = 0.1,
        dropout: float = 0.0,
        attn_implementation: str = "sdpa",
        explore_episodes: int = 0,
        explore_scale: float = 0.0,
        context_stride: int = 0,
        action_repeat: int = 1,
        **kwargs,
    ):
        # transformers keeps its own private attention setting; ours is a plain field so that it is
        # saved in config.json and never sent to the hub-kernel loader of transformers.
        kwargs.pop("_attn_implementation", None)
        super().__init__(**kwargs)
        for name, value in (
            ("obs_dim", obs_dim), ("act_dim", act_dim), ("d_model", d_model), ("n_layer", n_layer),
            ("n_head", n_head), ("max_episode_length", max_episode_length),
            ("max_context_episodes", max_context_episodes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if d_model % n_head:
            raise UsageError(f"n_head={n_head} must divide d_model={d_model}")
        if action_head not in ACTION_HEADS:
            raise choice_error("action_head", action_head, ACTION_HEADS)
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise choice_error("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
        if not isinstance(explore_episodes, int) or isinstance(explore_episodes, bool) or explore_episodes < 0:
            raise UsageError(f"explore_episodes must be an integer >= 0, got {explore_episodes!r}")
        if not isinstance(context_stride, int) or isinstance(context_stride, bool) or context_stride < 0:
            raise UsageError(f"context_stride must be an integer >= 0 (0: full context), got {context_stride!r}")
        if not isinstance(action_repeat, int) or isinstance(action_repeat, bool) or action_repeat < 1:
            raise UsageError(f"action_repeat (decision interval) must be an integer >= 1, got {action_repeat!r}")
        if not float(explore_scale) >= 0.0:
            raise UsageError(f"explore_scale must be >= 0, got {explore_scale!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {dropout!r}")
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.max_episode_length = max_episode_length
        self.max_context_episodes = max_context_episodes
        self.action_head = action_head
        self.reward_scale = float(reward_scale)
        self.dropout = float(dropout)
        self.attn_implementation = attn_implementation
        self.explore_episodes = explore_episodes
        self.explore_scale = float(explore_scale)
        self.context_stride = context_stride
        self.action_repeat = action_repeat

    @property
    def compact(self) -> bool:
        """Whether earlier episodes are read compactly (``context_stride`` >= 1)."""
        return self.context_stride > 0

    @property
    def max_positions(self) -> int:
        """Tokens in the trained context: whole episodes of the longest allowed length (full context);
        for the compact one, the tokens of a trial of ``max_context_episodes`` episodes (KV-cache size)."""
        if self.compact:
            return (self.max_context_episodes - 1) * len(kept_steps(self.max_episode_length, self.context_stride)) \
                + self.max_episode_length
        return self.max_context_episodes * self.max_episode_length


def kept_steps(length: int, stride: int) -> list[int]:
    """The steps of a finished episode of ``length`` steps that the compact context keeps: every
    ``stride``-th (steps stride-1, 2 stride-1, ...) and the last."""
    return [t for t in range(length) if (t + 1) % stride == 0 or t == length - 1]


def compact_mask(episode_index: torch.Tensor, step: torch.Tensor, stride: int) -> torch.Tensor:
    """(T, T) bool, True where token i may attend token j under the compact context: j <= i, and j in
    i's episode or a kept token (``kept_steps``) of an earlier one. ``episode_index`` and ``step`` (T,) lay
    out whole episodes end to end (the last token of the sequence ends its episode, or is in the episode
    of every later query)."""
    t = step.shape[0]
    last = torch.ones(t, dtype=torch.bool, device=step.device)
    last[:-1] = episode_index[1:] != episode_index[:-1]
    kept = ((step + 1) % stride == 0) | last  # (T,)
    same = episode_index[:, None] == episode_index[None, :]  # (T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=step.device).tril()
    return causal & (same | kept[None, :])


# ------------------------------------------------------------------------------- pure functions
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


def tanh_gaussian_nll(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """-log p(actions) per token (B,T) under tanh(N(mean, exp(log_std))), summed over action dims.

    Change of variables (Haarnoja et al. 2018, SAC, appendix C): log p(a) = log N(u) - sum log(1 - a^2),
    u = atanh(a); 1 - a^2 is written as 4 / (e^u + e^-u)^2 through softplus for stability.
    """
    a = actions.clamp(-1.0 + ATANH_EPS, 1.0 - ATANH_EPS)
    u = torch.atanh(a)
    normal_logp = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)^2)
    return -(normal_logp - log_det).sum(-1)


def action_loss(output: "ICLPolicyOutput", target_actions: torch.Tensor) -> torch.Tensor:
    """Scalar loss over the labelled tokens: MSE of the action for the deterministic head, NLL for the
    Gaussian. A token whose target holds NaN is unlabelled (context only, e.g. a learner's episodes
    before a hand-over): it adds no loss; a batch without any label gives 0."""
    target = target_actions.float()
    labelled = ~torch.isnan(target).any(-1)  # (B, T)
    target = torch.where(rearrange(labelled, "b t -> b t 1"), target, torch.zeros_like(target))
    if output.log_std is None:
        per_token = ((output.action.float() - target) ** 2).mean(-1)  # (B, T)
    else:
        per_token = tanh_gaussian_nll(output.mean.float(), output.log_std.float(), target)  # (B, T)
    return (per_token * labelled).sum() / labelled.sum().clamp(min=1)


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


def window_loss(model, batch: dict, target: str = "expert") -> torch.Tensor:
    """The action loss of a windows batch (B,W,...) through ``model``'s forward: the expert's action
    (DPT) or the one taken (AD-eps) as target. ``model`` may be a DDP wrapper, whose forward all-reduces
    the gradients in backward: the reason this is a function and not only ``ICLPolicy.loss``."""
    if target not in TARGETS:
        raise choice_error("target", target, TARGETS)
    prev_actions, prev_rewards = shift_previous(batch["actions"], batch["rewards"], batch["episode_start"])
    out = model(batch["obs"], prev_actions, prev_rewards, batch["episode_start"], batch["step_in_episode"])
    return action_loss(out, batch["expert_actions"] if target == "expert" else batch["actions"])


# ------------------------------------------------------------------------------------- KV cache
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

    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep, of the tokens from ``start`` on, only those at ``offsets`` (ascending, relative to
        ``start``), moved up to follow the tokens before ``start``: how the compact context forgets a
        finished episode's other steps. The kept keys and values are the ones computed when the episode
        was current, exactly what training's compact mask gives them."""
        index = torch.as_tensor(offsets, dtype=torch.long, device=self.keys.device) + start
        end = start + len(offsets)
        self.keys[:, :, :, start:end] = self.keys.index_select(3, index)
        self.values[:, :, :, start:end] = self.values.index_select(3, index)
        self.length = end

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k, v (B,nh,T,hs) after the cached tokens; return all (B,nh,S,hs)."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# ----------------------------------------------------------------------- attention functions
def _causal_mask(t: int, s: int, device) -> torch.Tensor:
    """(T, S) bool, True where query i (absolute position S-T+i) may attend key j."""
    past = s - t
    return torch.arange(s, device=device)[None, :] <= (past + torch.arange(t, device=device))[:, None]


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


# ---------------------------------------------------------------------------------------- blocks
class CausalSelfAttention(nn.Module):
    def __init__(self, config: ICLPolicyConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attend, cache: KVCache | None, layer: int, mask: torch.Tensor | None = None):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, S, hs)
        y, weights = attend(q, k, v, self.dropout if self.training else 0.0, mask)
        y = rearrange(y, "b h t d -> b t (h d)")
        return self.resid_dropout(self.proj(y)), weights


class MLP(nn.Module):
    def __init__(self, config: ICLPolicyConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.proj = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm Transformer block (nanoGPT layout)."""

    def __init__(self, config: ICLPolicyConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x, attend, cache: KVCache | None, layer: int, mask: torch.Tensor | None = None):
        a, weights = self.attn(self.ln_1(x), attend, cache, layer, mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), weights


# ----------------------------------------------------------------------------------------- model
@dataclass
class ICLPolicyOutput(ModelOutput):
    """action: (B,T,A) in [-1,1], the deterministic action tanh(mean); mean: (B,T,A) before tanh;
    log_std: (B,T,A) for the Gaussian head, else None; cache: the KVCache when use_cache (also
    readable as ``past_key_values``: transformers 5 renamed the field); attentions: per layer
    (B,nh,T,S) when output_attentions (eager only)."""

    action: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    log_std: torch.Tensor | None = None
    cache: KVCache | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> KVCache | None:
        return self.cache


@dataclass(frozen=True)
class DecodePlan:
    """What ``ICLPolicy.decode_step`` reads: config values and parameter tensors, gathered once."""

    d_model: int
    n_head: int
    act_dim: int
    max_episode_length: int
    reward_scale: float
    gaussian: bool
    token_w_t: torch.Tensor
    token_b: torch.Tensor
    step_emb: torch.Tensor
    pos_emb: torch.Tensor
    layers: tuple
    ln_f: tuple
    head_w: torch.Tensor
    head_b: torch.Tensor


class ICLPolicy(PreTrainedModel):
    """Causal Transformer policy: tokens (obs, previous action, previous reward, episode start) + step
    and position embeddings -> blocks -> action head."""

    config_class = ICLPolicyConfig
    base_model_prefix = "icl_policy"
    main_input_name = "obs"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Block"]

    def __init__(self, config: ICLPolicyConfig):
        super().__init__(config)
        d = config.d_model
        # obs, previous action, previous reward, episode-start flag -> one token
        self.token_in = nn.Linear(config.obs_dim + config.act_dim + 2, d)
        self.step_emb = nn.Embedding(config.max_episode_length, d)
        if config.compact:  # the episode's index in the trial
            self.episode_emb = nn.Embedding(config.max_context_episodes, d)
        else:  # the token's position in the window
            self.pos_emb = nn.Embedding(config.max_positions, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d)
        out = config.act_dim * (2 if config.action_head == "tanh_gaussian" else 1)
        self.head = nn.Linear(d, out)
        self.gradient_checkpointing = False
        self.set_attn_implementation(config.attn_implementation)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_attn_implementation(self, attn_implementation: str, **_) -> None:
        """Choose the attention kernel ("sdpa", "eager", "flash_attention_2"); flash falls back once."""
        self.attn_implementation = resolve_attn_implementation(attn_implementation)
        self.config.attn_implementation = attn_implementation
        self._attend = ATTENTION_FUNCTIONS[self.attn_implementation]

    def gradient_checkpointing_enable(self, **_) -> None:
        """Recompute each block's activations in backward (training without a cache only)."""
        self._set_gradient_checkpointing(True, partial(checkpoint, use_reentrant=False))

    def new_cache(self, batch: int, capacity: int | None = None, device=None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` tokens (default: the trained context)."""
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, c.d_model // c.n_head, capacity or c.max_positions,
                       device=device or self.device, dtype=self.dtype)

    def forward(
        self,
        obs: torch.Tensor,
        prev_actions: torch.Tensor,
        prev_rewards: torch.Tensor,
        episode_start: torch.Tensor,
        step_in_episode: torch.Tensor,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        episode_index: torch.Tensor | None = None,
    ) -> ICLPolicyOutput:
        """Actions for T new tokens (B,T,...) after the ``past_key_values`` tokens (written into it).

        Compact context (``context_stride`` >= 1): the new tokens lay out whole episodes end to end (the
        last may be the current, unfinished one) and attend under ``compact_mask``; every cached token is
        visible to them (the caller keeps only kept tokens of finished episodes there: ``KVCache.keep``).
        ``episode_index`` (B,T): each token's episode in the trial; None: counted from the new tokens'
        episode starts, the first new token in episode 0. The lockstep batch shares its layout (row 0's).
        """
        c = self.config
        b, t = obs.shape[:2]
        if output_attentions and self.attn_implementation != "eager":
            raise UsageError(f"output_attentions needs attn_implementation='eager', got {self.attn_implementation!r}")
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(b, device=obs.device)
        cache = past_key_values if use_cache or past_key_values is not None else None
        past = cache.length if cache is not None else 0
        # A compact context without a cache reads whole trials of any length (the episode table clamps).
        if (cache is not None or not c.compact) and (past + t > c.max_positions
                                                    or (cache is not None and past + t > cache.capacity)):
            raise UsageError(f"context of {past + t} tokens exceeds the model's {c.max_positions} "
                             f"(max_context_episodes x max_episode_length)")
        if int(step_in_episode.max()) >= c.max_episode_length:
            raise UsageError(f"step_in_episode {int(step_in_episode.max())} >= max_episode_length {c.max_episode_length}")

        dtype = self.dtype
        tokens = torch.cat(
            [obs.to(dtype), prev_actions.to(dtype),
             rearrange(prev_rewards.to(dtype) * c.reward_scale, "b t -> b t 1"),
             rearrange(episode_start.to(dtype), "b t -> b t 1")],
            dim=-1,
        )  # (B, T, obs + act + 2)
        mask = None
        if c.compact:
            if episode_index is None:
                episode_index = episode_start.long().cumsum(1) - episode_start[:, :1].long()  # (B, T)
            layout = episode_index[0]  # (T,), shared by the lockstep batch
            mask = compact_mask(layout, step_in_episode[0].long(), c.context_stride)  # (T, T)
            if past:
                mask = torch.cat([mask.new_ones(t, past), mask], dim=1)  # (T, past + T)
            where = self.episode_emb(layout.clamp(max=c.max_context_episodes - 1))  # (T, d)
        else:
            positions = torch.arange(past, past + t, device=obs.device)  # (T,), shared by the lockstep batch
            where = self.pos_emb(positions)
        x = self.token_in(tokens) + self.step_emb(step_in_episode.long()) + where
        x = self.drop(x)  # (B, T, d)

        attentions = []
        for layer, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                x, weights = self._gradient_checkpointing_func(block.__call__, x, self._attend, None, layer, mask)
            else:
                x, weights = block(x, self._attend, cache, layer, mask)
            if output_attentions:
                attentions.append(weights)
        if cache is not None:
            cache.length += t

        head = self.head(self.ln_f(x))  # (B, T, A) or (B, T, 2A)
        if c.action_head == "tanh_gaussian":
            mean, log_std = rearrange(head, "b t (two a) -> two b t a", two=2)
            log_std = log_std.clamp(*LOG_STD_RANGE)
        else:
            mean, log_std = head, None
        return ICLPolicyOutput(
            action=torch.tanh(mean),
            mean=mean,
            log_std=log_std,
            cache=cache if use_cache else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def decode_plan(self) -> "DecodePlan":
        """The tensors ``decode_step`` reads, gathered once per rollout instead of ~100 module attribute
        lookups per step. They are the parameters themselves (and views of them), so in-place updates
        show through; build a new plan after moving the model or replacing a parameter."""
        c = self.config
        ln = lambda m: (m.weight, m.bias, m.eps)  # noqa: E731
        layers = tuple(
            (*ln(b.ln_1), b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight, b.attn.proj.bias,
             *ln(b.ln_2), b.mlp.fc.weight, b.mlp.fc.bias, b.mlp.proj.weight, b.mlp.proj.bias)
            for b in self.blocks
        )
        return DecodePlan(
            d_model=c.d_model, n_head=c.n_head, act_dim=c.act_dim, max_episode_length=c.max_episode_length,
            reward_scale=float(c.reward_scale), gaussian=c.action_head == "tanh_gaussian",
            token_w_t=self.token_in.weight.t(), token_b=self.token_in.bias, step_emb=self.step_emb.weight,
            pos_emb=(self.episode_emb if c.compact else self.pos_emb).weight, layers=layers, ln_f=ln(self.ln_f), head_w=self.head.weight,
            head_b=self.head.bias,
        )

    def decode_step(
        self,
        obs: torch.Tensor,
        prev_action: torch.Tensor,
        prev_reward: torch.Tensor,
        episode_start: bool,
        step: int,
        cache: KVCache,
        plan: "DecodePlan | None" = None,
        position: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One new token per sequence after the ``cache``'s tokens: the rollout's hot path.

        obs (B,obs_dim), prev_action (B,A), prev_reward (B,); the batch steps in lockstep, so the
        episode-start flag and the step in the episode are plain Python values shared by all rows.
        Returns (mean, log_std or None), each (B,A), and advances the cache by one token: the same
        numbers as ``forward`` on one token with ``past_key_values=cache`` (tested), in about 40 plain
        torch calls without module dispatch, einops parsing or shape checks of the general forward; a
        caller that steps many times passes ``plan=self.decode_plan()`` to skip the module attribute
        lookups too (docs/benchmarks.md). Always SDPA: one query needs no weights, and eager gives the
        same numbers. ``position``: the row of the position table to add: the cache position (None, the
        full context) or, for the compact context, the episode's index in the trial (clamped to the table).
        """
        if plan is None:
            plan = self.decode_plan()
        b, p, d, nh = obs.shape[0], cache.length, plan.d_model, plan.n_head
        if p >= cache.capacity or not 0 <= step < plan.max_episode_length:
            raise UsageError(f"decode_step at position {p} (capacity {cache.capacity}), step {step} "
                             f"(max_episode_length {plan.max_episode_length})")
        dtype = plan.token_b.dtype
        token = torch.cat((obs.to(dtype), prev_action.to(dtype), (prev_reward.to(dtype) * plan.reward_scale)[:, None]), 1)
        # token_in(token, flag) + step_emb[step] + pos_emb[p]: one fused multiply-add with a bias row shared
        # by the batch; the episode-start flag, the same for every row, adds its weight column to that row.
        where = p if position is None else min(position, plan.pos_emb.shape[0] - 1)
        row = plan.token_b + plan.step_emb[step] + plan.pos_emb[where]
        x = torch.addmm(row + plan.token_w_t[-1] if episode_start else row, token, plan.token_w_t[:-1])  # (B, d)
        for (ln1_w, ln1_b, ln1_eps, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, ln2_eps, fc_w, fc_b, mp_w, mp_b), \
                keys, values in zip(plan.layers, cache.layer_keys, cache.layer_values):  # keys (B, nh, capacity, hs)
            h = torch.layer_norm(x, (d,), ln1_w, ln1_b, ln1_eps)
            qkv = F.linear(h, qkv_w, qkv_b).view(b, 3, nh, 1, d // nh)  # (three h d) layout
            keys[:, :, p : p + 1] = qkv[:, 1]
            values[:, :, p : p + 1] = qkv[:, 2]
            y = F.scaled_dot_product_attention(qkv[:, 0], keys[:, :, : p + 1], values[:, :, : p + 1])
            x = x + F.linear(y.reshape(b, d), proj_w, proj_b)
            h = torch.layer_norm(x, (d,), ln2_w, ln2_b, ln2_eps)
            x = x + F.linear(F.gelu(F.linear(h, fc_w, fc_b)), mp_w, mp_b)
        cache.length = p + 1
        head = F.linear(torch.layer_norm(x, (d,), *plan.ln_f), plan.head_w, plan.head_b)
        if plan.gaussian:
            mean, log_std = head.split(plan.act_dim, dim=1)
            return mean, log_std.clamp(*LOG_STD_RANGE)
        return head, None

    def loss(self, batch: dict, target: str = "expert") -> torch.Tensor:
        """Loss on a windows batch (B,W,...): predict the expert's action (DPT) or the one taken (AD)."""
        return window_loss(self, batch, target)

    # ---------------------------------------------------------------------------------- files
    def save_pretrained(self, save_directory, **_) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory``, each atomically."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(path / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        atomic_write_text(path / CONFIG_NAME, self.config.to_json_string(use_diff=False))

    @classmethod
    def from_pretrained(cls, path, attn_implementation: str | None = None, device=None, dtype=None, **_):
        """Load a directory written by ``save_pretrained``; any problem is one UsageError naming the file."""
        config = load_config(path)
        if attn_implementation is not None:
            config.attn_implementation = attn_implementation
        weights = Path(path) / WEIGHTS_NAME
        if not weights.is_file():
            raise UsageError(f"missing weights file {weights}")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"cannot read weights {weights}: {str(e).splitlines()[0]}") from None
        model = cls(config)
        _check_state_matches(model.state_dict(), state, weights, Path(path) / CONFIG_NAME)
        model.load_state_dict(state, strict=True)
        model.name_or_path = str(path)  # where it came from, for reports
        model.to(device=device, dtype=dtype)
        return model.eval()


def load_config(path) -> ICLPolicyConfig:
    """The ``config.json`` of a checkpoint directory, validated; errors name the file."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"checkpoint directory {path} does not exist")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise UsageError(f"missing config file {file}")
    d = read_json(file)
    if not isinstance(d, dict) or d.get("model_type") != ICLPolicyConfig.model_type:
        got = d.get("model_type") if isinstance(d, dict) else type(d).__name__
        raise UsageError(f"{file} has model_type {got!r}; expected {ICLPolicyConfig.model_type!r}")
    try:
        return ICLPolicyConfig.from_dict(d)
    except UsageError as e:
        raise UsageError(f"{file}: {e}") from None
    except TypeError as e:
        raise UsageError(f"{file}: bad field: {e}") from None


def _check_state_matches(expected: dict, found: dict, weights: Path, config: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in found and found[k].shape != v.shape]
    problems = [f"{what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
    if problems:
        raise UsageError(f"weights {weights} do not match {config} ({'; '.join(problems)})")


AutoConfig.register(ICLPolicyConfig.model_type, ICLPolicyConfig, exist_ok=True)
AutoModel.register(ICLPolicyConfig, ICLPolicy, exist_ok=True)
