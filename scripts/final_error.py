"""Where an in-context agent's episodes end on the test tasks: success per episode, final TCP-goal
distance, and the final error split by axis for failed and successful trials.

    python scripts/final_error.py runs/I --tasks 50 --explore-episodes 0

The error by axis is what showed the lateral (x) ambiguity in docs/results.md ("What made it transfer").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import get_suite, make_trial_envs
from icl_metarl.incontext.agent import InContextAgent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--episode-length", type=int, default=100)
    p.add_argument("--explore-episodes", type=int, default=None, help="override the checkpoint's exploration")
    p.add_argument("--explore-scale", type=float, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    tasks = get_suite(args.suite).tasks("test", 0)[: args.tasks]
    agent = InContextAgent.from_pretrained(args.checkpoint, explore_episodes=args.explore_episodes,
                                           explore_scale=args.explore_scale)
    envs = make_trial_envs(tasks, args.episode_length, seed=0)
    print(f"{args.checkpoint} on {len(tasks)} {args.suite} test tasks, explore {agent.explore_episodes} "
          f"episode(s) at {agent.explore_scale}")
    # the harness's one loop, on envs we keep: after each episode they still hold its last state
    episodes = play_trials(agent, tasks, 0, 0, args.episodes, 0, args.episode_length, envs=envs)
    for k, records in enumerate(episodes):
        success = np.array([r["success"] for r in records])
        err = np.array([e._env.tcp_center - e._env._get_pos_goal() for e in envs.envs])  # (N, 3)
        d = np.linalg.norm(err, axis=1)
        line = (f"episode {k + 1}: success {success.mean():.2f}, final TCP distance median {np.median(d):.3f} m, "
                f"mean {d.mean():.3f}, p90 {np.quantile(d, 0.9):.3f}")
        for name, mask in (("failed", ~success), ("succeeded", success)):
            if mask.any():
                line += f"; |error| x/y/z {name} {np.abs(err[mask]).mean(0).round(3).tolist()}"
        print(line, flush=True)
    envs.close()


if __name__ == "__main__":
    main()
