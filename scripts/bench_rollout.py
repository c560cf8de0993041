"""Rollout speed of the in-context agent: env steps/s of (a) a random policy, (b) the KV-cached agent,
(c) the same agent recomputing the whole context every step, on parallel ML1 trials (sync vector env).

    python scripts/bench_rollout.py --trials 10 20 --episodes 4 --episode-length 100

The model is the default ``ICLPolicyConfig`` (untrained: speed does not depend on the weights). Each
figure is the best of ``--repeats`` runs, since the machine is shared; ratios are within this run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from icl_metarl.baselines import RandomAgent
from icl_metarl.icl_agent import InContextAgent
from icl_metarl.model import ICLPolicy, ICLPolicyConfig
from icl_metarl.suites import get_suite, make_trial_envs


def steps_per_second(agent, envs, num_trials: int, episodes: int, episode_length: int) -> float:
    """Env steps/s over whole trials, timing act + step + observe + end_episode (resets excluded)."""
    agent.start_trials(num_trials, seed=0)
    elapsed = 0.0
    for _ in range(episodes):
        obs, _ = envs.reset()
        t0 = time.perf_counter()
        for _ in range(episode_length):
            obs, reward, _, _, info = envs.step(agent.act(obs))
            agent.observe(reward, info["success"])
        agent.end_episode()
        elapsed += time.perf_counter() - t0
    return num_trials * episodes * episode_length / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--trials", type=int, nargs="+", default=[10, 20], help="parallel trials (one task each)")
    p.add_argument("--episodes", type=int, default=4, help="episodes per trial")
    p.add_argument("--episode-length", type=int, default=100, help="steps per episode (short, to keep it quick)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting; the best is reported")
    p.add_argument("--skip-recompute", action="store_true", help="leave out (c), the slowest")
    args = p.parse_args()

    config = ICLPolicyConfig()  # the default model, max_context_episodes=4 >= --episodes: no re-encoding
    torch.manual_seed(0)
    model = ICLPolicy(config)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"{args.suite}, {args.episodes} episodes x {args.episode_length} steps per trial, sync vector env")
    print(f"model: default ICLPolicyConfig (d={config.d_model}, {config.n_layer} layers, {config.n_head} heads, "
          f"{n_params / 1e6:.2f}M parameters, {model.attn_implementation}); torch threads {torch.get_num_threads()}")
    tasks = get_suite(args.suite).tasks("test", 0)
    for n in args.trials:
        envs = make_trial_envs(tasks[:n], episode_length=args.episode_length, seed=0)
        agents = {"random": RandomAgent(), "cached": InContextAgent(model)}
        if not args.skip_recompute:
            agents["recompute"] = InContextAgent(model, use_cache=False)
        best = {k: 0.0 for k in agents}
        for _ in range(args.repeats):
            for name, agent in agents.items():  # interleaved, so drifting load hits all alike
                best[name] = max(best[name], steps_per_second(agent, envs, n, args.episodes, args.episode_length))
        envs.close()
        line = f"{n:3d} trials: (a) random {best['random']:7.0f} steps/s  (b) cached {best['cached']:7.0f}"
        if "recompute" in best:
            line += f"  (c) recompute {best['recompute']:6.0f}"
        line += f"  | b/a {best['cached'] / best['random']:.2f}x"
        if "recompute" in best:
            line += f"  b/c {best['cached'] / best['recompute']:.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
