"""Attention probes: what an in-context policy looks at while it adapts, and what it actually uses.

Plays test trials as the evaluator does (its agent, seeds and rollout loop, so the probed episodes
are the ones the evaluator scores), records the attention of every layer and head on the last episode
(the one with the most context), and measures causally: the same last episode replayed by the same
agent with the earlier episodes' rewards shuffled or zeroed, with the earlier episodes removed, or with
one head zeroed. Not for: training, the shared evaluation protocol (``evaluation.py``).

Python API, three lines from a notebook::

    from icl_metarl.probes.probe import probe
    result = probe("runs/icl-reach", "ML1:reach-v3", trials=10)
    result.save("probes/reach")          # metrics.json, PNG heatmaps, probe.md
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.colors as mcolors
import numpy as np
import torch
from einops import rearrange, reduce
from matplotlib.figure import Figure

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.evaluation import trial_seed
from icl_metarl.harness.files import (
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
    versions,
)
from icl_metarl.harness.rollout import StepHook, play_trials
from icl_metarl.harness.statistics import Z95, normal_interval
from icl_metarl.harness.suites import (
    check_action_repeat,
    check_episode_length,
    check_playable,
    decisions_per_episode,
    get_suite,
    make_trial_envs,
)
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.model import ICLPolicy
from icl_metarl.incontext.tokens import episode_inputs, shift_previous
from icl_metarl.probes.config import CONTEXT_CONDITIONS, ProbeConfig

METRICS_FORMAT = "icl_metarl.probes/1"  # names the file format, not the module: kept across moves
#: attention figures of the layer x head summary, in the order drawn
SUMMARY_STATS = (
    "current_episode_share", "previous_episode_share", "earlier_episodes_share",
    "high_reward_enrichment", "success_enrichment", "start_share", "entropy_normalised",
)


# ------------------------------------------------------------------------- attention statistics
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


# ------------------------------------------------------------------------------ trials as tensors
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


# ------------------------------------------------------------------------------- interventions
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


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run the model with another attention kernel while inside (eager returns the weights)."""
    before = model.config.attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# ------------------------------------------------------------------------------------- playing
def recorder(into: Episodes) -> StepHook:
    """An ``on_step`` hook of the rollout loop writing every step into ``into`` (B,K,T,...) at its
    episode and step: the observation acted on, the action taken (exploration included), the outcome."""

    def on_step(episode, t, obs, info, actions, reward, success) -> None:
        into.obs[:, episode, t], into.actions[:, episode, t] = obs, actions
        into.rewards[:, episode, t], into.success[:, episode, t] = reward, success

    return on_step


@torch.inference_mode()
def teacher_forced_actions(model, context: Episodes, episode: Episodes) -> np.ndarray:
    """The model's own actions (B,T,A), no exploration or sampling, on ``episode``'s tokens after
    ``context``: same states for every condition, so action differences are the context's effect alone."""
    both = context.join(episode) if context.count else episode
    y = model(**model_inputs(both, model.device))
    return y.action[:, -episode.rewards.shape[2]:].float().cpu().numpy()


@torch.inference_mode()
def record_attention(model, ep: Episodes, high_reward_quantile: float = 0.9, chunk_bytes: float = 6e8,
                     keep_trial: int | None = 0):
    """Attention statistics of every layer/head for the last episode's queries (per trial: dicts of
    (B,L,H,...) arrays) and, for ``keep_trial``, the full attention (L,H,S,S) of that trial."""
    c = model.config
    inputs = model_inputs(ep, model.device)
    b, s = inputs["prev_rewards"].shape
    k, t = ep.count, ep.rewards.shape[2]
    key_episode = torch.arange(k, device=model.device).repeat_interleave(t).expand(b, s)  # (B, S)
    success = torch.as_tensor(rearrange(ep.success, "b k t -> b (k t)"), device=model.device)
    _, key_success = shift_previous(torch.zeros(b, s, 1, device=model.device), success, inputs["episode_start"])
    query_mask = key_episode == k - 1
    per_trial = max(1, int(chunk_bytes // (4 * c.n_layer * c.n_head * s * s)))
    stats, kept = [], None
    with attention_implementation(model, "eager"):
        for lo in range(0, b, per_trial):
            sl = slice(lo, min(b, lo + per_trial))
            y = model(**{n: v[sl] for n, v in inputs.items()}, output_attentions=True)
            # only the last episode's query rows enter the statistics: a quarter of the work at 4 episodes
            layers = [attention_statistics(a[:, :, -t:].float(), key_episode[sl], inputs["prev_rewards"][sl],
                                           key_success[sl], inputs["episode_start"][sl], query_mask[sl, -t:],
                                           n_lags=k, high_reward_quantile=high_reward_quantile)
                      for a in y.attentions]
            stats.append({n: torch.stack([d[n] for d in layers], 1).cpu().numpy() for n in layers[0]})  # (b, L, H, ...)
            if keep_trial is not None and sl.start <= keep_trial < sl.stop:
                kept = torch.stack([a[keep_trial - lo].float() for a in y.attentions]).cpu().numpy()  # (L, H, S, S)
    return {n: np.concatenate([d[n] for d in stats]) for n in stats[0]}, kept


# ------------------------------------------------------------------------------------ the probe
@dataclass
class ProbeResult:
    """Everything a probe measured; ``to_json`` is metrics.json, ``save`` writes it with figures and probe.md."""

    config: ProbeConfig
    model_info: dict
    baseline: dict
    attention: dict
    causal: dict
    ablation: dict | None
    example: dict = field(repr=False)
    timing: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return _jsonable({
            "format": METRICS_FORMAT, "config": asdict(self.config), "model": self.model_info,
            "baseline": self.baseline, "attention": self.attention, "causal": self.causal,
            "ablation": self.ablation, "example_heads": self.example["heads"], "timing": self.timing,
            "versions": versions(),
        })

    def save(self, out_dir) -> list[Path]:
        """Write metrics.json, the PNG heatmaps and probe.md into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "metrics.json"]
        atomic_write_json(paths[0], self.to_json())
        paths += _draw_figures(self, out)
        atomic_write_text(out / "probe.md", describe(self, [p.name for p in paths[1:]]))
        return paths + [out / "probe.md"]


def load_model(model_or_path):
    """An ICLPolicy as given, or loaded from a checkpoint directory (config.json + model.safetensors)."""
    if isinstance(model_or_path, ICLPolicy):
        return model_or_path.eval()
    if isinstance(model_or_path, (str, Path)):
        return ICLPolicy.from_pretrained(model_or_path)
    raise UsageError(f"probe needs an ICLPolicy or a checkpoint directory, got {type(model_or_path).__name__}")


def check_config(cfg: ProbeConfig, model) -> ProbeConfig:
    c = model.config
    check_playable(cfg.suite, cfg.split)
    repeat = int(getattr(c, "action_repeat", 1))  # the interval the model was trained at (1 before it was recorded)
    if cfg.action_repeat is not None and check_action_repeat(cfg.action_repeat) != repeat:
        raise UsageError(f"action repeat {cfg.action_repeat}: the model was trained to act every {repeat} simulator "
                         f"steps; probe it with action repeat {repeat} or leave it unset")
    length = c.max_episode_length * repeat if cfg.episode_length is None else check_episode_length(cfg.episode_length)
    if decisions_per_episode(length, repeat) > c.max_episode_length:
        raise UsageError(f"episode length {length} ({decisions_per_episode(length, repeat)} decisions at action repeat "
                         f"{repeat}) > the model's max_episode_length {c.max_episode_length}")
    episodes = c.max_context_episodes if cfg.episodes is None else cfg.episodes
    if not isinstance(episodes, int) or episodes < 2:
        raise UsageError(f"episodes must be an integer >= 2 (the last one is probed with the earlier ones as context), got {episodes!r}")
    if not isinstance(cfg.trials, int) or cfg.trials < 1:
        raise UsageError(f"trials must be a positive integer, got {cfg.trials!r}")
    for name in cfg.conditions:
        if name not in INTERVENTIONS:
            raise choice_error("probe condition", name, CONTEXT_CONDITIONS)
    if not isinstance(cfg.torch_threads, int) or cfg.torch_threads < 1:
        raise UsageError(f"torch_threads must be a positive integer, got {cfg.torch_threads!r}")
    if not 0.0 < cfg.high_reward_quantile < 1.0:
        raise UsageError(f"high_reward_quantile must be in (0, 1), got {cfg.high_reward_quantile}")
    for layer, head in cfg.heads:
        if not (0 <= layer < c.n_layer and 0 <= head < c.n_head):
            raise UsageError(f"head ({layer}, {head}) outside the model's {c.n_layer} layers x {c.n_head} heads")
    return ProbeConfig(**{**asdict(cfg), "episodes": episodes, "episode_length": length, "action_repeat": repeat,
                          "conditions": tuple(cfg.conditions), "heads": tuple(tuple(h) for h in cfg.heads)})


def decisions(cfg: ProbeConfig) -> int:
    """Decisions (the model's tokens, the probe's steps) per episode of a checked config."""
    return decisions_per_episode(cfg.episode_length, cfg.action_repeat)


def probe(model_or_path, suite: str | None = None, config: ProbeConfig | None = None, progress=None,
          **overrides) -> ProbeResult:
    """Probe an in-context policy on a suite's tasks: attention statistics, causal and head-ablation probes.

    ``overrides`` are ProbeConfig fields (``trials=10, episode_length=200``); ``progress`` a callable
    taking one line of text (the CLI prints them). The trials are played as the evaluator plays seed
    ``seed`` with K = ``episodes`` and E = 0 (same agent settings, seeds, rollout loop): the probe's
    per-episode success and return are the evaluator's records of the same tasks.
    """
    say = progress or (lambda _msg: None)
    model = load_model(model_or_path)
    cfg = config or ProbeConfig()
    if suite is not None:
        overrides["suite"] = suite
    try:
        cfg = ProbeConfig(**{**asdict(cfg), **overrides})
    except TypeError as e:
        raise UsageError(f"unknown probe setting: {e}") from None
    cfg = check_config(cfg, model)
    tasks = get_suite(cfg.suite).tasks(cfg.split, cfg.suite_seed)
    if cfg.trials > len(tasks):
        raise UsageError(f"trials={cfg.trials} but {cfg.suite} has {len(tasks)} {cfg.split} tasks")
    tasks = tasks[: cfg.trials]
    window = model.config.max_context_episodes  # episodes in the context, the probed one included
    rng = np.random.default_rng(cfg.seed)
    timing = {}
    return _probe(model, cfg, tasks, window, rng, timing, say)


def _probe(model, cfg: ProbeConfig, tasks, window: int, rng, timing: dict, say) -> ProbeResult:
    t0 = time.perf_counter()
    b, k, length, repeat = len(tasks), cfg.episodes, cfg.episode_length, cfg.action_repeat
    # The evaluator's agent (the checkpoint's exploration, its acting default) and seeds (one batch
    # from task 0): the probed episodes are the ones the evaluator scores, exploration included.
    agent = InContextAgent(model, device=model.device, cpu_threads=cfg.torch_threads)
    seed = trial_seed(cfg.seed, 0)
    envs = make_trial_envs(tasks, length, seed, action_repeat=repeat)  # one set for the trials and every replay
    try:
        played = Episodes.empty(b, k, decisions(cfg), model.config.obs_dim, model.config.act_dim)
        success, returns = np.zeros((b, k)), np.zeros((b, k))  # (B, K), from the loop's records
        draws = None
        for records in play_trials(agent, tasks, seed, seed, k, 0, length, on_step=recorder(played), envs=envs,
                                   action_repeat=repeat):
            e = records[0]["episode"]
            success[:, e] = [r["success"] for r in records]
            returns[:, e] = [r["return"] for r in records]
            if e == k - 2:
                draws = agent.random_state()  # what the probed episode draws; its replays draw the same
            say(f"episode {e + 1}/{k}{' (probed)' if e == k - 1 else ''}: success {success[:, e].mean():.2f}")
        context = played.take(slice(max(0, k - window), k - 1))  # what the agent's window held
        last = played.take(slice(k - 1, k))
        timing["play_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        base_actions = teacher_forced_actions(model, context, last)
        stats, kept = record_attention(model, context.join(last), cfg.high_reward_quantile)
        timing["attention_s"] = time.perf_counter() - t1

        def replay(ctx: Episodes) -> dict:
            """The probed episode again, by the same agent code, after ``ctx`` instead of its context."""
            agent.start_trials(b, seed)
            agent.prime(ctx.obs, ctx.actions, ctx.rewards, episode_index=k - 1, random_state=draws)
            (records,) = play_trials(agent, tasks, seed, seed, 1, 0, length, envs=envs, start_trials=False,
                                     action_repeat=repeat)
            moved = np.linalg.norm(teacher_forced_actions(model, ctx, last) - base_actions, axis=-1)  # (B, T)
            return {"success": np.array([r["success"] for r in records], dtype=np.float64),
                    "return": np.array([r["return"] for r in records]), "action_change": moved.mean(axis=1)}

        t1 = time.perf_counter()
        causal = {}
        for name in cfg.conditions:
            causal[name] = replay(INTERVENTIONS[name](context, rng))
            say(f"{name}: success {causal[name]['success'].mean():.2f}")
        timing["causal_s"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        ablation = None
        if cfg.ablate_heads:
            c = model.config
            runs = {}
            for layer in range(c.n_layer):
                for head in range(c.n_head):
                    with ablated_head(model, layer, head):
                        runs[(layer, head)] = replay(context)
                say(f"ablated layer {layer}: success " + ", ".join(
                    f"{runs[(layer, h)]['success'].mean():.2f}" for h in range(c.n_head)))
            ablation = {m: np.array([[runs[(l, h)][m] for h in range(c.n_head)] for l in range(c.n_layer)])
                        for m in ("success", "return", "action_change")}  # (L, H, B)
        timing["ablation_s"] = time.perf_counter() - t1
    finally:
        envs.close()
    timing["total_s"] = time.perf_counter() - t0
    return _summarise(cfg, model, success, returns, stats, kept, causal, ablation, timing)


def _mean_ci(x: np.ndarray) -> dict:
    """Mean over trials (last axis) and a 95% normal interval half-width (NaN for one trial)."""
    mean, half = normal_interval(x, axis=-1)
    return {"mean": mean, "ci95": half}


def _summarise(cfg, model, success, returns, stats, kept, causal, ablation, timing) -> ProbeResult:
    """``success``, ``returns``: (B, K) per trial and episode, as the rollout loop's records give them."""
    c = model.config
    base_success, base_return = success[:, -1], returns[:, -1]
    baseline = {
        "success_per_episode": success.mean(axis=0), "return_per_episode": returns.mean(axis=0),
        "success": base_success.mean(), "return": base_return.mean(),
        "success_by_trial": success, "return_by_trial": returns,
    }
    attention = {}
    for name, v in stats.items():  # (B, L, H, ...)
        attention[name] = np.nanmean(v, axis=0) if np.isfinite(v).any() else np.full(v.shape[1:], np.nan)
        if name in ("high_reward_share", "success_share"):
            attention[name.replace("_share", "_trials")] = int(np.isfinite(v[:, 0, 0]).sum())
    share = attention["episode_share"]  # (L, H, K)
    attention["current_episode_share"] = share[..., 0]
    attention["previous_episode_share"] = share[..., 1]
    for name in ("high_reward", "success"):
        attention[f"{name}_enrichment"] = attention[f"{name}_share"] / attention[f"{name}_tokens"]
    causal_out = {}
    for name, r in causal.items():
        causal_out[name] = {
            "success": r["success"].mean(), "return": r["return"].mean(),
            "success_change": _mean_ci(r["success"] - base_success),
            "return_change": _mean_ci(r["return"] - base_return),
            "action_change": _mean_ci(r["action_change"]),
        }
    ablation_out = None
    if ablation is not None:
        ablation_out = {
            "success": ablation["success"].mean(-1),
            "success_change": _mean_ci(ablation["success"] - base_success),
            "return_change": _mean_ci(ablation["return"] - base_return),
            "action_change": _mean_ci(ablation["action_change"]),
        }
    heads = _pick_heads(attention, cfg.heads)
    t = decisions(cfg)  # tokens per episode
    example = {
        "heads": [{"layer": l, "head": h, "why": why} for (l, h), why in heads],
        "maps": {(l, h): pool_map(kept[l, h], cfg.max_heatmap_bins) for (l, h), _ in heads},
        "episode_steps": t, "episodes": kept.shape[-1] // t,
    }
    model_info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        **{k: getattr(c, k) for k in ("d_model", "n_layer", "n_head", "max_episode_length", "max_context_episodes",
                                      "action_head", "reward_scale")},
        "context_episodes_probed": kept.shape[-1] // t,
        "checkpoint": getattr(model, "name_or_path", None) or None,
    }
    timing["steps_per_s"] = (cfg.trials * t * (cfg.episodes + len(cfg.conditions) +  # the agent's steps: decisions
                             (c.n_layer * c.n_head if cfg.ablate_heads else 0))) / timing["total_s"]
    return ProbeResult(cfg, model_info, baseline, attention, causal_out, ablation_out, example, timing)


def _pick_heads(attention: dict, extra: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], str]]:
    """The heads drawn as query x key maps: most on earlier episodes, on high-reward keys, on starts."""
    picks: list[tuple[tuple[int, int], str]] = [((l, h), "requested") for l, h in extra]
    for name, why in (("earlier_episodes_share", "most attention on earlier episodes"),
                      ("high_reward_enrichment", "most enriched on high-reward steps"),
                      ("start_share", "most attention on episode starts")):
        v = np.nan_to_num(np.asarray(attention[name], dtype=np.float64), nan=-np.inf)
        lh = tuple(int(i) for i in np.unravel_index(np.argmax(v), v.shape))
        if np.isfinite(v[lh]) and lh not in [p for p, _ in picks]:
            picks.append((lh, why))
    return picks


def pool_map(a: np.ndarray, max_bins: int) -> tuple[np.ndarray, int]:
    """Mean-pool a (S,S) attention map into bins of w steps (at most ``max_bins`` a side): (map, w)."""
    s = a.shape[-1]
    w = max(1, math.ceil(s / max_bins))
    pad = (-s) % w
    a = np.pad(a, ((0, pad), (0, pad)))
    return reduce(a, "(q w1) (k w2) -> q k", "mean", w1=w, w2=w), w


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ------------------------------------------------------------------------------------- figures
_TITLES = {
    "current_episode_share": "share on the current episode",
    "previous_episode_share": "share on the previous episode",
    "earlier_episodes_share": "share on all earlier episodes",
    "high_reward_enrichment": "high-reward steps: attention / token share",
    "success_enrichment": "success steps: attention / token share",
    "start_share": "share on episode-start tokens",
    "entropy_normalised": "entropy / log(keys)",
}


def _grid(ax, values: np.ndarray, title: str, cmap: str, vmin=None, vmax=None, center=None):
    v = np.asarray(values, dtype=np.float64)
    norm = None
    if center is not None and np.isfinite(v).any():
        span = max(np.nanmax(np.abs(v - center)), 0.05)  # all-equal grids get a readable scale
        norm = mcolors.TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
    im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, vmin=None if norm else vmin, vmax=None if norm else vmax,
                   norm=norm, aspect="auto")
    for (l, h), x in np.ndenumerate(v):
        ax.text(h, l, "n/a" if not np.isfinite(x) else f"{x:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(v.shape[1]))
    ax.set_yticks(range(v.shape[0]))
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def _save_figure(fig, path: Path) -> Path:
    atomic_write_figure(fig, path, dpi=110, bbox_inches="tight")
    return path


def _draw_figures(result: ProbeResult, out: Path) -> list[Path]:
    paths = []
    a = result.attention
    fig = Figure(figsize=(18, 8), layout="constrained")
    axes = fig.subplots(2, 4)
    for ax, name in zip(axes.flat, SUMMARY_STATS):
        enrich = name.endswith("enrichment")
        _grid(ax, a[name], _TITLES[name], "RdBu_r" if enrich else "viridis",
              vmin=0, vmax=None if enrich else 1, center=1.0 if enrich else None)
    axes.flat[-1].axis("off")
    fig.suptitle(f"attention of the probed episode's queries, mean over {result.config.trials} trials")
    paths.append(_save_figure(fig, out / "attention_layer_head.png"))

    if result.ablation is not None:
        fig = Figure(figsize=(11, 4), layout="constrained")
        axes = fig.subplots(1, 2)
        _grid(axes[0], result.ablation["success_change"]["mean"], "success change, head zeroed", "RdBu_r", center=0.0)
        _grid(axes[1], result.ablation["action_change"]["mean"], "mean |action change|, head zeroed", "magma", vmin=0)
        fig.suptitle("head ablation on the probed episode")
        paths.append(_save_figure(fig, out / "ablation_layer_head.png"))

    ex = result.example
    for info in ex["heads"]:
        l, h = info["layer"], info["head"]
        m, w = ex["maps"][(l, h)]
        fig = Figure(figsize=(6.5, 5.5), layout="constrained")
        ax = fig.subplots()
        pos = m[m > 0]
        floor = max(float(pos.min()) if pos.size else 1e-6, 1e-6)
        im = ax.imshow(np.where(m > 0, m, np.nan), cmap="viridis", aspect="auto", interpolation="nearest",
                       norm=mcolors.LogNorm(vmin=floor, vmax=max(float(m.max()), floor * 10)))
        for e in range(1, ex["episodes"]):
            x = e * ex["episode_steps"] / w - 0.5
            ax.axvline(x, color="w", lw=0.8, ls="--")
            ax.axhline(x, color="w", lw=0.8, ls="--")
        ax.set_xlabel(f"key step (bins of {w}; dashed: episode boundaries)")
        ax.set_ylabel(f"query step (bins of {w})")
        ax.set_title(f"layer {l} head {h}: {info['why']} (trial 0)", fontsize=9)
        fig.colorbar(im, ax=ax, label="mean attention weight per key")
        paths.append(_save_figure(fig, out / f"attention_map_L{l}H{h}.png"))
    return paths


# ------------------------------------------------------------------------------------ probe.md
def _fmt(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.2f}"


def describe(result: ProbeResult, figures: Sequence[str] = ()) -> str:
    """A short markdown note stating what the numbers and figures show."""
    cfg, a, b = result.config, result.attention, result.baseline
    L, H = np.asarray(a["current_episode_share"]).shape
    k = result.model_info["context_episodes_probed"]
    lines = [
        "# Attention probe",
        "",
        f"Model: {result.model_info['parameters']:,} parameters, {L} layers x {H} heads, "
        f"checkpoint {result.model_info['checkpoint']}. Suite {cfg.suite} ({cfg.split} split), {cfg.trials} trials "
        f"of {cfg.episodes} episodes of {cfg.episode_length} steps"
        f"{f' (a decision every {cfg.action_repeat}: {decisions(cfg)} per episode)' if cfg.action_repeat > 1 else ''}"
        f"; the last episode is probed with "
        f"{k - 1} earlier episode(s) in context. Took {result.timing['total_s']:.0f} s.",
        "",
        f"Success per episode: {', '.join(_fmt(x) for x in b['success_per_episode'])} "
        f"(return {', '.join(f'{x:.0f}' for x in b['return_per_episode'])}).",
        "",
        "## Where attention goes (queries of the probed episode, mean over trials)",
        "",
    ]
    share = np.asarray(a["episode_share"])  # (L, H, K)
    mean_share = share.reshape(L * H, -1).mean(0)
    lines.append("Mean over heads, share by episode lag (0 = current): "
                 + ", ".join(f"lag {i}: {x:.2f}" for i, x in enumerate(mean_share)) + ".")
    uniform = _uniform_lag_share(k, decisions(cfg))
    lines.append("A head attending uniformly to what it can see would give " +
                 ", ".join(f"{x:.2f}" for x in uniform) + f" (causal mask, {k} episodes).")
    e = np.asarray(a["earlier_episodes_share"])
    lh = np.unravel_index(np.nanargmax(e), e.shape)
    lines.append(f"Share on earlier episodes ranges {e.min():.2f}-{e.max():.2f} over heads; most: layer {lh[0]} "
                 f"head {lh[1]}, {e[lh]:.2f} (previous episode {share[lh][1]:.2f})"
                 + (" - all heads alike within 0.01." if e.max() - e.min() < 0.01 else "."))
    for name, what in (("high_reward", "high-reward steps (top "
                        f"{round(100 * (1 - cfg.high_reward_quantile))}% of context rewards)"),
                       ("success", "success steps")):
        enr = np.asarray(a[f"{name}_enrichment"], dtype=np.float64)
        if not np.isfinite(enr).any():
            lines.append(f"- {what}: none in any trial's context, no figure.")
            continue
        lh = np.unravel_index(np.nanargmax(enr), enr.shape)
        lines.append(f"- {what} (in {a[f'{name}_trials']} of {cfg.trials} trials): of the attention on earlier "
                     f"episodes, heads put {np.nanmin(a[f'{name}_share']):.2f}-{np.nanmax(a[f'{name}_share']):.2f} "
                     f"on them against a token share of {np.nanmean(a[f'{name}_tokens']):.2f}; most enriched: "
                     f"layer {lh[0]} head {lh[1]}, x{enr[lh]:.2f}.")
    st = np.asarray(a["start_share"])
    lh = np.unravel_index(np.argmax(st), st.shape)
    lines.append(f"- episode-start tokens: mean share {st.mean():.2f} against a token share of "
                 f"{np.mean(a['start_tokens']):.4f}; highest layer {lh[0]} head {lh[1]}, {st[lh]:.2f}.")
    en = np.asarray(a["entropy_normalised"])
    lines.append(f"- entropy / log(visible keys): {en.min():.2f}-{en.max():.2f} (1 = uniform, 0 = one key).")
    lines += ["", "## What the policy uses (causal probes on the probed episode)", "",
              f"Baseline success {_fmt(b['success'])}, return {b['return']:.0f}. Each row replays the same "
              "episode (same task and start) with the context changed; action change is the mean L2 distance "
              "of the actions on the baseline episode's own states (teacher-forced), 95% intervals over trials.",
              "", "| context | success | success change | action change |", "|---|---|---|---|"]
    for name, r in result.causal.items():
        lines.append(f"| {name} | {_fmt(r['success'])} | {_fmt(r['success_change']['mean'])} "
                     f"± {_fmt(r['success_change']['ci95'])} | {r['action_change']['mean']:.3f} "
                     f"± {r['action_change']['ci95']:.3f} |")
    if result.ablation is not None:
        sc = np.asarray(result.ablation["success_change"]["mean"])
        ac = np.asarray(result.ablation["action_change"]["mean"])
        lo, hi = np.unravel_index(np.argmin(sc), sc.shape), np.unravel_index(np.argmax(ac), ac.shape)
        lines += ["", f"Head ablation: zeroing one head changed success by {sc.min():+.2f} to {sc.max():+.2f} "
                  f"(largest drop: layer {lo[0]} head {lo[1]}); actions moved most for layer {hi[0]} head "
                  f"{hi[1]} ({ac[hi]:.3f})."]
    lines += ["", f"With {cfg.trials} trials a success rate has a 95% interval of about "
              f"±{Z95 * math.sqrt(0.25 / cfg.trials):.2f}; the changes are paired (same task and start) and carry "
              "their own intervals: read a change inside its interval as noise.", "", "## Figures", ""]
    notes = {
        "attention_layer_head.png": "each statistic above per layer (rows) and head (columns); enrichment is "
                                    "centred on 1 (red: more than the token share).",
        "ablation_layer_head.png": "change in success and in actions when each head is zeroed.",
    }
    for f in figures:
        if f in notes:
            lines.append(f"- `{f}`: {notes[f]}")
        elif f.startswith("attention_map_"):
            lines.append(f"- `{f}`: query step x key step of trial 0 for one head, log colour, "
                         "episode boundaries dashed; a band below the diagonal one episode wide = attention "
                         "to the same step of the previous episode.")
    return "\n".join(lines) + "\n"


def _uniform_lag_share(k: int, t: int) -> np.ndarray:
    """Lag shares of a uniform causal head, averaged over the last of k episodes of t steps."""
    q = np.arange((k - 1) * t, k * t) + 1.0  # keys visible to each query of the last episode
    current = (np.arange(t) + 1.0) / q
    earlier = (t / q)[:, None] * np.ones(k - 1)
    return np.concatenate([[current.mean()], earlier.mean(0)])
