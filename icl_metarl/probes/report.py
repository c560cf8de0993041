"""What a probe writes: its result (``metrics.json``), the layer x head heatmaps and attention maps, and
``probe.md``, the note that says in words what they show.

Not for: measuring anything (``probe.py``); every number here was computed there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib.colors as mcolors
import numpy as np
from matplotlib.figure import Figure

from icl_metarl.harness.files import atomic_write_figure, atomic_write_json, atomic_write_text, versions
from icl_metarl.harness.statistics import Z95
from icl_metarl.probes.config import ProbeConfig, decisions

METRICS_FORMAT = "icl_metarl.probes/1"  # names the file format, not the module: kept across moves
#: attention figures of the layer x head summary, in the order drawn
SUMMARY_STATS = (
    "current_episode_share", "previous_episode_share", "earlier_episodes_share",
    "high_reward_enrichment", "success_enrichment", "start_share", "entropy_normalised",
)


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


def _success_by_environment(baseline: dict) -> list[str]:
    """One line per environment (where the trials span several): its trials' success per episode."""
    envs = baseline.get("environment_by_trial") or []
    if len(set(envs)) < 2:
        return []
    success = np.asarray(baseline["success_by_trial"], dtype=np.float64)  # (B, K)
    lines = []
    for env in dict.fromkeys(envs):
        rows = success[[e == env for e in envs]]
        lines.append(f"- {env} ({len(rows)} trials): {', '.join(f'{x:.2f}' for x in rows.mean(axis=0))}")
    return lines


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
        *_success_by_environment(b),
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
