"""Settings of a probe run, free of torch so that the command line can show them without loading a model.

Not for: running probes (``probe.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from icl_metarl.harness.settings import PARSE
from icl_metarl.harness.suites import decisions_per_episode

CONTEXT_CONDITIONS = ("shuffle_rewards", "zero_rewards", "remove_episodes")


def parse_head(text: str) -> tuple[int, int]:
    """'LAYER.HEAD' -> (layer, head), e.g. '0.1' -> (0, 1)."""
    layer, _, head = text.partition(".")
    if not (layer.isdigit() and head.isdigit()):
        raise ValueError(f"{text!r} is not LAYER.HEAD, e.g. 0.1")
    return int(layer), int(head)


@dataclass
class ProbeConfig:
    """What a probe plays and measures; CPU-friendly defaults (10 trials, minutes on 2 cores)."""

    suite: str = "ML1:reach-v3"
    """suite whose tasks are played (ML1:<env>-v3, ML10, ML45)"""
    split: str = "test"
    """task split: test (held-out tasks, default), validation (new train-environment tasks) or train"""
    trials: int = 10
    """parallel trials, spread evenly over the suite's environments: with N trials over n environments, the first
    ceil(N/n) tasks of each, the environments taken in turn (N a multiple of n: the evaluator's tasks at
    --tasks-per-env N/n, in its order); one environment's first N tasks where ``env`` is set"""
    env: str | None = None
    """probe only this environment of the suite (e.g. door-close-v3 on ML10's test split); None: all of them"""
    episodes: int | None = None
    """episodes per trial, >= 2; None: the model's max_context_episodes (the last one sees a full context)"""
    episode_length: int | None = None
    """simulator steps per episode; None: the evaluator's 500, or fewer where the model's max_episode_length
    decisions times its interval are fewer"""
    action_repeat: int | None = None
    """decision interval k: the agent acts every k-th simulator step, its action held, and the probe's per-step
    arrays and maps are per decision; None: the model's own (another than the model's is refused)"""
    seed: int = 0
    """seed of the trials, as one of the evaluator's --seeds (its first batch), and of the reward shuffle"""
    suite_seed: int = 0
    """Meta-World benchmark seed for the task list"""
    conditions: tuple[str, ...] = CONTEXT_CONDITIONS
    """context interventions replayed on the last episode (any of CONTEXT_CONDITIONS)"""
    ablate_heads: bool = True
    """replay the last episode once per head with that head zeroed (n_layer x n_head replays)"""
    heads: tuple[tuple[int, int], ...] = field(default=(), metadata={PARSE: parse_head})
    """(layer, head) pairs to draw as query x key maps, besides the three picked automatically"""
    high_reward_quantile: float = 0.9
    """a context token is 'high-reward' if its reward is at least this quantile of the trial's context"""
    max_heatmap_bins: int = 250
    """query x key maps are mean-pooled to at most this many bins a side"""
    torch_threads: int = 1
    """torch CPU threads while probing (the probe command and the quickstart's probe stage set them), the
    agent's steps included (1, as the evaluator's agent: one-token steps on more threads thrash on a shared
    machine, docs/benchmarks.md)"""


def decisions(cfg: ProbeConfig) -> int:
    """Decisions (the model's tokens, the probe's steps) per episode of a checked config."""
    return decisions_per_episode(cfg.episode_length, cfg.action_repeat)
