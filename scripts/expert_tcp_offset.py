"""Where Meta-World's scripted reach expert parks the TCP (where success is measured), told the true goal
or the goal raised by the hand-TCP offset (``suites.MEASURED_GOAL_OFFSETS``, which a study names in ``expert_goal_offsets``).

    python scripts/expert_tcp_offset.py --tasks 20

Prints, for each way of telling the goal: success, mean step of first success, final TCP-goal distance,
and the hand - TCP offset (mean and std over steps 1, 51, 100 of every trial).
"""

from __future__ import annotations

import argparse

import numpy as np

from icl_metarl.harness.suites import (
    MEASURED_GOAL_OFFSETS,
    expert_policy,
    get_suite,
    make_trial_envs,
    parse_goal_offsets,
)


def play(tasks, offset: np.ndarray, length: int) -> None:
    envs = make_trial_envs(tasks, length, seed=0)
    obs, info = envs.reset()
    policies = [expert_policy(t.env_name) for t in tasks]
    first, hand_tcp = np.zeros(len(tasks)), []
    for t in range(length):
        o = np.array(obs, dtype=np.float64)
        o[:, -3:] = np.asarray(info["goal"]) + offset
        obs, _, _, _, info = envs.step(np.stack([np.clip(p.get_action(x), -1, 1) for p, x in zip(policies, o)]))
        first = np.where((first == 0) & (np.asarray(info["success"]) > 0), t + 1, first)
        if t in (0, length // 2, length - 1):
            hand_tcp.append(obs[:, :3] - np.array([e._env.unwrapped.tcp_center for e in envs.envs]))
    tcp = np.array([e._env.unwrapped.tcp_center for e in envs.envs])
    d = np.linalg.norm(tcp - np.asarray(info["goal"]), axis=1)
    h = np.concatenate(hand_tcp)
    print(f"goal + {offset.round(3).tolist()}: success {np.mean(first > 0):.2f}, first success at step "
          f"{first[first > 0].mean():.1f}, final TCP-goal distance mean {d.mean():.4f} m (max {d.max():.4f}); "
          f"hand - TCP mean {h.mean(0).round(4)}, std {h.std(0).round(4)}")
    envs.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--tasks", type=int, default=20, help="first N test tasks")
    p.add_argument("--episode-length", type=int, default=100)
    args = p.parse_args()
    tasks = get_suite(args.suite).tasks("test", 0)[: args.tasks]
    print(f"{args.suite}, {len(tasks)} test tasks, one {args.episode_length}-step episode, success radius 0.05 m")
    env = tasks[0].env_name
    measured = parse_goal_offsets([MEASURED_GOAL_OFFSETS[env]]) if env in MEASURED_GOAL_OFFSETS else {}
    for offset in (np.zeros(3), np.asarray(measured.get(env, (0.0, 0.0, 0.0)))):
        play(tasks, offset, args.episode_length)


if __name__ == "__main__":
    main()
