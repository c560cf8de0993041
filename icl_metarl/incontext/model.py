"""The in-context policy: a causal Transformer over one token per timestep that predicts the action.

A ``transformers`` config/model pair (``save_pretrained`` / ``from_pretrained`` give a directory with
``config.json`` and ``model.safetensors``): the blocks, the forward, the one-token decode step and the
files. Not for: rollouts (``agent.py``), training loops (``train.py``), the configuration, attention
kernels, KV cache, token inputs and loss (``policy_config.py``, ``attention.py``, ``kv_cache.py``,
``tokens.py``, ``loss.py``).

Why the backbone is written here and not taken from ``transformers``: the agent runs one new token per
step for a batch of trials, so per-step latency bounds the rollout speed; nanoGPT-style blocks with a
preallocated static KV cache and SDPA step faster than the library's Llama and GPT-2 models with their
dynamic caches (measured in docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_bytes, atomic_write_text, read_json
from icl_metarl.incontext.attention import ATTENTION_FUNCTIONS, compact_mask, resolve_attn_implementation
from icl_metarl.incontext.kv_cache import KVCache
from icl_metarl.incontext.loss import window_loss
from icl_metarl.incontext.policy_config import ICLPolicyConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LOG_STD_RANGE = (-5.0, 2.0)


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
    obs_norm: tuple[torch.Tensor, torch.Tensor] | None  # (mean, 1 / std), or None for raw observations
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

    def _obs_norm(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, 1 / std) of the training observations as tensors, or None (raw observations). Kept in the
        config, not in buffers, so that the weights file is the same with and without them."""
        c = self.config
        if c.obs_mean is None:
            return None
        # cached per dtype, device and statistics: a new tensor every forward was a host-to-device copy
        # (and a sync) per step on a GPU
        key = (dtype, str(device), tuple(c.obs_mean), tuple(c.obs_std))
        cache = self.__dict__.setdefault("_obs_norm_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = (torch.tensor(c.obs_mean, dtype=dtype, device=device),
                          1.0 / torch.tensor(c.obs_std, dtype=dtype, device=device))
        return cache[key]

    def _normalized(self, obs: torch.Tensor, dtype) -> torch.Tensor:
        norm = self._obs_norm(dtype, obs.device)
        return obs.to(dtype) if norm is None else (obs.to(dtype) - norm[0]) * norm[1]

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
        visible to them (the caller keeps only kept tokens of finished episodes there: ``KVCache.keep``);
        under ``context_keep_best`` the kept tokens differ by row, chosen from ``prev_rewards``.
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
        # Checked here only on the CPU, where it is free: on an accelerator, reading the maximum back would
        # stall every forward. There the callers check at their edges (the agent counts its steps, windows
        # are cut from histories whose episode length the model was built with, the probes check theirs).
        if step_in_episode.device.type == "cpu" and int(step_in_episode.max()) >= c.max_episode_length:
            raise UsageError(f"step_in_episode {int(step_in_episode.max())} >= max_episode_length {c.max_episode_length}")

        dtype = self.dtype
        tokens = torch.cat(
            [self._normalized(obs, dtype), prev_actions.to(dtype),
             rearrange(prev_rewards.to(dtype) * c.reward_scale, "b t -> b t 1"),
             rearrange(episode_start.to(dtype), "b t -> b t 1")],
            dim=-1,
        )  # (B, T, obs + act + 2)
        mask = None
        if c.compact:
            if episode_index is None:
                episode_index = episode_start.long().cumsum(1) - episode_start[:, :1].long()  # (B, T)
            layout = episode_index[0]  # (T,), shared by the lockstep batch
            best = prev_rewards if c.kept_best else None  # each row keeps its own best steps
            mask = compact_mask(layout, step_in_episode[0].long(), c.context_stride, best, c.kept_best)  # (T, T) or (B, T, T)
            if past:
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], past), mask], dim=-1)  # (..., T, past + T)
            if mask.dim() == 3:
                mask = rearrange(mask, "b t s -> b 1 t s")  # one mask per row, shared by the heads
            where = self.episode_emb(layout.clamp(max=c.embedded_episodes - 1))  # (T, d)
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
            obs_norm=self._obs_norm(self.token_in.weight.dtype, self.token_in.weight.device),
            token_w_t=self.token_in.weight.t(), token_b=self.token_in.bias, step_emb=self.step_emb.weight,
            # compact: the trained episode rows only (decode_step reads the last for every later episode)
            pos_emb=self.episode_emb.weight[:c.embedded_episodes] if c.compact else self.pos_emb.weight,
            layers=layers, ln_f=ln(self.ln_f), head_w=self.head.weight, head_b=self.head.bias,
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
        obs = obs.to(dtype) if plan.obs_norm is None else (obs.to(dtype) - plan.obs_norm[0]) * plan.obs_norm[1]
        token = torch.cat((obs, prev_action.to(dtype), (prev_reward.to(dtype) * plan.reward_scale)[:, None]), 1)
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
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(path / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        write_policy_config(self.config, path)

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


def write_policy_config(config: ICLPolicyConfig, directory: str | Path) -> None:
    """``directory/config.json`` of an ICLPolicy checkpoint, atomically (``save_pretrained``'s, and each
    training checkpoint step's beside accelerate's weights)."""
    config.architectures = [ICLPolicy.__name__]
    atomic_write_text(Path(directory) / CONFIG_NAME, config.to_json_string(use_diff=False))
