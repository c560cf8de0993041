"""``icl-metarl suites NAME --check N``: the scripted expert told the goal (the oracle) and a random policy on
N tasks of every environment of a suite, through the shared evaluator: success and when it comes.

Per environment: expert success, the simulator steps to its first success (median, 90th percentile, max:
which episode length a study may use without cutting the expert off) and random success; the environments
below a threshold. With several decision intervals k (``--action-repeats``: the expert acts every k-th
step, its action held in between) each k is played on the same tasks and a last table gives each
environment's success at every k relative to the first, with the largest k at which every environment
keeps a fraction of it. Random is played at the first k only (``--no-random``: not at all, the expert's
tables alone). The tables go to stdout, the env steps/s to stderr. Not for: listing suites (``commands.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents
from icl_metarl.harness.suites import parse_goal_offsets


def play(suite: str, split: str, tasks_per_env: int, episode_length: int, action_repeat: int, seed: int,
         agents: list[str], out: Path | None, expert_goal_offsets: tuple[str, ...] = ()) -> dict:
    """One evaluation episode per task, no adaptation episode (the agents are memoryless); resumes in ``out``.
    The oracle is told the goal shifted by ``expert_goal_offsets`` (``ENV=x,y,z`` entries), as in a study."""
    config = EvalConfig(suite=suite, split=split, adaptation_episodes=0, evaluation_episodes=1,
                        episode_length=episode_length, seeds=(seed,), tasks_per_env=tasks_per_env, progress=False,
                        action_repeat=action_repeat).check()
    agents_ = load_agents(agents, options={"expert_goal_offsets": tuple(expert_goal_offsets)})
    return evaluate(agents_, config, out)


def by_env(results: dict, agent: str) -> dict[str, list[dict]]:
    """The records of one agent, per environment (environments in alphabetical order)."""
    envs: dict[str, list[dict]] = {}
    for rec in results["records"]:
        if rec["agent"] == agent:
            envs.setdefault(rec["env_name"], []).append(rec)
    return dict(sorted(envs.items()))


def steps_to_success(records: list[dict]) -> str:
    """Median | 90th percentile | max of the first-success step over the successful episodes."""
    steps = np.array([r["steps_to_success"] for r in records if r["success"]])
    return f"{np.median(steps):.0f} | {np.percentile(steps, 90):.0f} | {steps.max():.0f}" if len(steps) else "- | - | -"


def kept_up_to(by_k: dict[int, float], ks: tuple[int, ...], keep: float) -> int:
    """The largest k such that every k' <= k keeps ``keep`` of the success at the first k."""
    keeps = [k for k in ks if by_k[k] >= keep * by_k[ks[0]]]
    return max((k for k in ks if all(j in keeps for j in ks if j <= k)), default=ks[0])


def check(suite: str, options) -> None:
    """Print the tables (see the module's docstring); each evaluation is written under ``options.out``."""
    ks = tuple(options.action_repeats)
    if len(set(ks)) != len(ks):
        raise UsageError(f"--action-repeats must be distinct, got {list(ks)}")
    if not 0 < options.threshold <= 1 or not 0 < options.keep <= 1:
        raise UsageError(f"--threshold {options.threshold} / --keep {options.keep}: both must lie in (0, 1]")
    parse_goal_offsets(options.expert_goal_offsets, suite)
    success_at: dict[tuple[str, str], dict[int, float]] = {}
    below, rates = [], []
    random_column = " random success |" if options.random else ""
    print(f"| k | split | environment | tasks | success | steps to first success: median | p90 | max |{random_column}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if options.random else ""))
    for k in ks:
        for split in options.split:
            out = None if options.out is None else Path(options.out) / (split if len(ks) == 1 else f"k{k}/{split}")
            agents = ["oracle", "random"] if k == ks[0] and options.random else ["oracle"]
            r = play(suite, split, options.check, options.episode_length, k, options.seed, agents, out,
                     tuple(options.expert_goal_offsets))
            expert, random = by_env(r, "oracle"), by_env(r, "random")
            for env, recs in expert.items():
                success = float(np.mean([x["success"] for x in recs]))
                luck = f" {np.mean([x['success'] for x in random[env]]):.2f} |" if env in random else " - |"
                print(f"| {k} | {split} | {env} | {len(recs)} | {success:.2f} | {steps_to_success(recs)} |"
                      + (luck if options.random else ""))
                success_at.setdefault((split, env), {})[k] = success
                if success < options.threshold:
                    below.append(f"{env} ({split}, k={k}: {success:.2f})")
            seconds = sum(sum(by_seed.values()) for by_seed in r["timing"].values())
            steps = len(r["records"]) * options.episode_length
            if seconds:
                rates.append(f"{split}, k={k}: {steps / seconds:,.0f} env steps/s")
    print(f"\nbelow {options.threshold}: {', '.join(below) if below else 'none'}")
    print("played at " + "; ".join(rates), file=sys.stderr)
    if len(ks) > 1:
        print(f"\n| split | environment | {' | '.join(f'k={k}' for k in ks)} | kept (>= {options.keep} of k={ks[0]}) "
              f"up to |")
        print(f"|---|---|{'---|' * len(ks)}---|")
        worst = max(ks)
        for (split, env), by_k in sorted(success_at.items()):
            up_to = kept_up_to(by_k, ks, options.keep)
            worst = min(worst, up_to)
            print(f"| {split} | {env} | {' | '.join(f'{by_k[k]:.2f}' for k in ks)} | k={up_to} |")
        print(f"\nevery environment keeps >= {options.keep} of its k={ks[0]} success up to k={worst}")
