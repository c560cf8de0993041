"""Attention probes: what an in-context policy looks at while it adapts, and what it actually uses.

Plays test trials as the evaluator does (its agent, seeds and rollout loop, so the probed episodes
are the ones the evaluator scores), records the attention of every layer and head on the last episode
(the one with the most context), and measures causally: the same last episode replayed by the same
agent with the earlier episodes' rewards shuffled or zeroed, with the earlier episodes removed, or with
one head zeroed; then summarises it all into a ``ProbeResult``. Not for: training, the shared evaluation
protocol (``evaluation.py``), the statistics, interventions or files themselves
(``attention_statistics.py``, ``interventions.py``, ``report.py``).

Python API, three lines from a notebook::

    from icl_metarl.probes.probe import probe
    result = probe("runs/icl-reach", "ML1:reach-v3", trials=10)
    result.save("probes/reach")          # metrics.json, PNG heatmaps, probe.md
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from einops import rearrange, reduce

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.evaluation import trial_seed
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.statistics import normal_interval
from icl_metarl.harness.suites import (
    DEFAULT_EPISODE_LENGTH,
    check_action_repeat,
    check_episode_length,
    check_playable,
    decisions_per_episode,
    get_suite,
    make_trial_envs,
)
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.model import ICLPolicy
from icl_metarl.incontext.tokens import shift_previous
from icl_metarl.probes.attention_statistics import attention_statistics
from icl_metarl.probes.config import CONTEXT_CONDITIONS, ProbeConfig, decisions
from icl_metarl.probes.episodes import Episodes, model_inputs, recorder
from icl_metarl.probes.interventions import INTERVENTIONS, ablated_head
from icl_metarl.probes.report import ProbeResult


# ------------------------------------------------------------------------------------ measuring
@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run the model with another attention kernel while inside (eager returns the weights)."""
    before = model.config.attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


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
def load_model(model_or_path):
    """An ICLPolicy as given, or loaded from a checkpoint directory (config.json + model.safetensors)."""
    if isinstance(model_or_path, ICLPolicy):
        return model_or_path.eval()
    if isinstance(model_or_path, (str, Path)):
        return ICLPolicy.from_pretrained(model_or_path)
    raise UsageError(f"probe needs an ICLPolicy or a checkpoint directory, got {type(model_or_path).__name__}")


def probe_tasks(tasks: list, cfg: ProbeConfig) -> list:
    """The trials' tasks: ``cfg.env``'s first N, or N spread evenly over the environments (the first
    ceil(N/n) of each, environments taken in turn, kept in the split's order); a split lists its tasks
    environment by environment, so its first N tasks would all be one environment's."""
    envs = list(dict.fromkeys(t.env_name for t in tasks))
    if cfg.env is not None:
        if cfg.env not in envs:
            raise choice_error(f"environment of {cfg.suite}'s {cfg.split} split", cfg.env, envs)
        envs = [cfg.env]
    per_env = {e: [j for j, t in enumerate(tasks) if t.env_name == e] for e in envs}
    if cfg.trials > sum(map(len, per_env.values())):
        raise UsageError(f"trials={cfg.trials} but {cfg.suite} has {sum(map(len, per_env.values()))} {cfg.split} "
                         f"tasks{f' of {cfg.env}' if cfg.env else ''}")
    in_turn = [j for rank in range(max(map(len, per_env.values()))) for e in envs if rank < len(per_env[e])
               for j in [per_env[e][rank]]]
    return [tasks[j] for j in sorted(in_turn[: cfg.trials])]


def check_config(cfg: ProbeConfig, model) -> ProbeConfig:
    c = model.config
    check_playable(cfg.suite, cfg.split)
    repeat = int(getattr(c, "action_repeat", 1))  # the interval the model was trained at (1 before it was recorded)
    if cfg.action_repeat is not None and check_action_repeat(cfg.action_repeat) != repeat:
        raise UsageError(f"action repeat {cfg.action_repeat}: the model was trained to act every {repeat} simulator "
                         f"steps; probe it with action repeat {repeat} or leave it unset")
    # the evaluator's episodes by default: 500 simulator steps (Meta-World's), fewer only where the model holds fewer
    # decisions; max_episode_length x k can exceed 500 (167 x 3 = 501), and Meta-World ends the episode at 500
    length = (min(DEFAULT_EPISODE_LENGTH, c.max_episode_length * repeat) if cfg.episode_length is None
              else check_episode_length(cfg.episode_length))
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
    tasks = probe_tasks(get_suite(cfg.suite).tasks(cfg.split, cfg.suite_seed), cfg)
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
    result = _summarise(cfg, model, success, returns, stats, kept, causal, ablation, timing)
    result.baseline["environment_by_trial"] = [t.env_name for t in tasks]
    return result


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
