"""Does repeating a successful episode's actions repeat its success? (docs/ml10.md, session 24)

Every episode of a trial starts from the same state, and MuJoCo is deterministic, so an agent that replays,
open loop, the actions of an episode that succeeded should succeed again: "keep what you found" needs no
skill, only memory. This measures it on a suite's split: the histories' noisy expert (told the goal,
perturbed as in `scripts/reproduce_ml10_test.sh`) plays episode 1 of each trial; episode 2 replays
episode 1's actions decision by decision, never looking at the observations. Printed per environment:
episode 1's success, episode 2's, and episode 2's given that episode 1 succeeded (the replay's fidelity).

    python scripts/replay_check.py --suite ML10 --split test --tasks-per-env 10 --action-repeat 3 \
        --out results/replay-ml10-test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from icl_metarl.harness.agent import ReplayBest
from icl_metarl.harness.evaluation import first_per_env
from icl_metarl.harness.files import atomic_write_json, atomic_write_text
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import check_playable, get_suite
from icl_metarl.incontext.noise import NoisyExpertAgent


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="ML10")
    p.add_argument("--split", default="test")
    p.add_argument("--tasks-per-env", type=int, default=10)
    p.add_argument("--action-repeat", type=int, default=3)
    p.add_argument("--episode-length", type=int, default=500)
    p.add_argument("--noise-max", type=float, default=0.15, help="goal perturbation of episode 1 (m, level drawn per trial)")
    p.add_argument("--action-noise", type=float, default=0.3, help="Gaussian sd on each of episode 1's actions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for replay.json and replay.md")
    a = p.parse_args(argv)
    check_playable(a.suite, a.split)
    tasks = first_per_env(get_suite(a.suite).tasks(a.split), a.tasks_per_env, f"{a.suite} {a.split} split")
    # the evaluator's replay-best variant with one adaptation episode: episode 2 replays episode 1 open loop
    agent = ReplayBest(NoisyExpertAgent("goal", "random", a.noise_max, 2, action_noise=a.action_noise), 1)
    start = time.process_time()
    records = list(play_trials(agent, tasks, a.seed, a.seed, 1, 1, a.episode_length, action_repeat=a.action_repeat))
    cpu = time.process_time() - start
    first = np.array([r["success"] for r in records[0]], bool)
    second = np.array([r["success"] for r in records[1]], bool)
    envs = sorted({t.env_name for t in tasks})
    rows, per_env = [], {}
    for env in envs + ["all"]:
        m = np.array([t.env_name == env or env == "all" for t in tasks])
        found = first[m]
        kept = second[m][found]
        unfound = second[m][~found]
        per_env[env] = {"trials": int(m.sum()), "episode_1": float(found.mean()), "episode_2": float(second[m].mean()),
                        "episode_2_given_1": float(kept.mean()) if kept.size else None, "found": int(found.sum()),
                        "episode_2_given_not_1": float(unfound.mean()) if unfound.size else None}
        e = per_env[env]
        given = f"{e['episode_2_given_1']:.2f} ({kept.sum()}/{kept.size})" if kept.size else "-"
        not_given = f"{unfound.mean():.2f} ({unfound.sum()}/{unfound.size})" if unfound.size else "-"
        rows.append(f"| {env} | {e['trials']} | {e['episode_1']:.2f} | {e['episode_2']:.2f} | {given} | {not_given} |")
    table = "\n".join([
        f"Replay check, {a.suite} {a.split} split, {a.tasks_per_env} tasks per environment, k = {a.action_repeat}, "
        f"{a.episode_length}-step episodes, seed {a.seed}; episode 1: the expert told a goal perturbed by up to "
        f"{a.noise_max} m, actions + N(0, {a.action_noise}); episode 2: episode 1's actions replayed open loop. "
        f"{cpu:.0f} CPU-s.", "",
        "| environment | trials | episode 1 success | episode 2 (replay) success | episode 2 given episode 1 succeeded "
        "| episode 2 given episode 1 failed |",
        "|---|---|---|---|---|---|", *rows])
    print(table)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "replay.md", table + "\n")
        atomic_write_json(out / "replay.json", {"config": vars(a), "cpu_seconds": cpu, "per_env": per_env,
                                                "episode_1": first.tolist(), "episode_2": second.tolist()})


if __name__ == "__main__":
    main()
