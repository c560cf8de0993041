"""Speed of a probe run against the environment cost alone, both measured here in the same run.

Baseline: the same number of vector steps (every episode the probe plays, replays included) with
uniform random actions, so the ratio says how much the model, the attention recording and the
bookkeeping add on top of Meta-World. Usage: python scripts/bench_probe.py [--trials 10] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from icl_metarl.harness.suites import ACT_DIM, get_suite, make_trial_envs
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig
from icl_metarl.probes.probe import ProbeConfig, probe


def random_steps(suite: str, trials: int, episodes: int, length: int) -> float:
    """Seconds to play ``episodes`` episodes of ``length`` steps on ``trials`` tasks with random actions."""
    torch.set_num_threads(1)
    tasks = get_suite(suite).tasks("test")[:trials]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    envs = make_trial_envs(tasks, length, 0)
    for _ in range(episodes):
        envs.reset()
        for _ in range(length):
            envs.step(rng.uniform(-1, 1, (trials, ACT_DIM)).astype(np.float32))
    envs.close()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="model directory (default: the default ICLPolicyConfig, random weights)")
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--episode-length", type=int, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ICLPolicy.from_pretrained(args.checkpoint) if args.checkpoint else ICLPolicy(ICLPolicyConfig()).eval()
    cfg = ProbeConfig(suite=args.suite, trials=args.trials, episode_length=args.episode_length)
    result = probe(model, config=cfg)
    c, rc = model.config, result.config
    episodes = rc.episodes + len(rc.conditions) + c.n_layer * c.n_head
    base = random_steps(args.suite, args.trials, episodes, rc.episode_length)
    t = result.timing
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {c.n_layer} layers x {c.n_head} heads; "
          f"{args.trials} trials, {rc.episodes} episodes of {rc.episode_length} steps + {episodes - rc.episodes} replays")
    print(f"probe total {t['total_s']:.1f} s (play {t['play_s']:.1f}, attention {t['attention_s']:.1f}, "
          f"causal {t['causal_s']:.1f}, ablation {t['ablation_s']:.1f}); {t['steps_per_s']:.0f} env steps/s")
    print(f"random actions, same {episodes} episodes: {base:.1f} s; probe / random = {t['total_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
