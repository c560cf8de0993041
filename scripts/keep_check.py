"""Does the in-context agent go back where it succeeded? Positions, not success flags (docs/ml10.md, session 31).

On goal-hidden environments the agent often *finds* a success in its adaptation episodes and then fails in the
evaluation episodes (the reports' "found / kept"). This plays an agent's 10 + 3 episode trials on chosen
environments, records where the effector was (the hand for reach, the object for push and pick-place), and asks,
per trial that found a success:

- where the adaptation episodes' reward peaked (the best step), and how far that was from the true goal;
- how close each evaluation episode came to that best position, and to the goal;
- how far the mean of all the top-rewarded steps lay from the goal (the rewards are flat at their top inside the
  success region, so the best step is any point inside it; session 33).

An agent that keeps what it found comes back near its best position; one that ignores its context goes where its
prior takes it (``--wiped``: the same agent with its context wiped every episode, the control). ``--context expert``
asks whether the agent can return from a context that shows the goal plainly: the scripted expert, told the goal,
plays the adaptation episodes (it goes to the goal and stays), the agent reads them as its own context (primed) and
plays the evaluation episodes. An agent that returns precisely from that context but not from its own is held back
by what its own episodes show; one that misses from both, by how it maps a context to a position. The trials are this
script's own (env seed 0 of the batch, the evaluator's task order), not the evaluator's; the figures describe the
agent, they are not a validation score. Positions are the observation's (the hand's end-effector point, the
object's), not the finger centre that reach's success rule measures, so a few centimetres separate them.

    python scripts/keep_check.py studies/ml10-cpu-s0/pretrain-norm-dagger4 --out results/keep-check-...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from icl_metarl.harness.baselines import make_baseline
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.evaluation import first_per_env
from icl_metarl.harness.files import atomic_write_json, atomic_write_text
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import decisions_per_episode, get_suite, make_trial_envs
from icl_metarl.incontext.agent import InContextAgent

#: which observation slice is the effector that must reach the goal
EFFECTOR = {"reach-v3": slice(0, 3), "push-v3": slice(4, 7), "pick-place-v3": slice(4, 7)}
#: who plays the adaptation episodes: the agent itself, or the scripted expert told the goal (the agent reads them)
CONTEXTS = ("own", "expert")


def top_centroid(pos: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, int]:
    """Where the adaptation episodes' top-rewarded decisions led on average, and how many there were. ``pos``
    (episodes, steps, 3) and ``reward`` (episodes, steps). Meta-World's rewards are flat at their top inside the
    success region (reach: 10 per simulator step for every finger centre within 5 cm of the goal), so the best
    step is any point inside; the mean of all of them is an estimate of the region's centre."""
    top = reward >= reward.max() - 1e-6 * max(1.0, abs(float(reward.max())))
    e, t = np.nonzero(top)
    return pos[e, np.minimum(t + 1, pos.shape[1] - 1)].mean(axis=0), int(top.sum())


def check(agent_dir: str, envs: list[str], tasks_per_env: int, adaptation: int, evaluation: int, seed: int,
          explore: tuple[int, str, float], wiped: bool = False, context: str = "own") -> dict:
    unknown = [e for e in envs if e not in EFFECTOR]
    if unknown:
        raise UsageError(f"--envs {unknown}: allowed {', '.join(EFFECTOR)}")
    if context not in CONTEXTS:
        raise choice_error("--context", context, CONTEXTS)
    if context == "expert" and wiped:
        raise UsageError("--context expert with --wiped: a wiped agent reads no context (use one or the other)")
    agent = InContextAgent.from_pretrained(agent_dir, explore_episodes=explore[0], explore_kind=explore[1],
                                           explore_scale=explore[2], wipe_context_each_episode=wiped)
    tasks = [t for t in get_suite("ML10").tasks("validation", 0) if t.env_name in envs]
    tasks = first_per_env(tasks, tasks_per_env, "validation split of ML10")
    k = agent.action_repeat
    steps = decisions_per_episode(500, k)
    episodes = adaptation + evaluation
    pos = np.zeros((len(tasks), episodes, steps, 3))
    reward = np.zeros((len(tasks), episodes, steps))
    goal = np.zeros((len(tasks), 3))
    success = np.zeros((len(tasks), episodes), bool)
    columns = np.stack([np.arange(EFFECTOR[task.env_name].start, EFFECTOR[task.env_name].stop) for task in tasks])

    obs_seen = np.zeros((len(tasks), adaptation, steps, agent.model.config.obs_dim), np.float32)
    actions_taken = np.zeros((len(tasks), adaptation, steps, agent.model.config.act_dim), np.float32)

    def on_step(episode, t, obs, info, actions, r, s, first=0):
        e = first + episode
        pos[:, e, t] = np.take_along_axis(np.asarray(obs), columns, axis=1)
        reward[:, e, t] = r
        goal[:] = np.asarray(info["goal"])
        if e < adaptation:  # what the agent reads when it is primed with another player's episodes
            obs_seen[:, e, t], actions_taken[:, e, t] = obs, actions

    def play(player, first, adapt, start_trials=True, envs=None):
        hook = lambda *a: on_step(*a, first=first)  # noqa: E731
        for records in play_trials(player, tasks, env_seed=seed, agent_seed=seed, adaptation_episodes=adapt,
                                   evaluation_episodes=episodes - first - adapt, episode_length=500, on_step=hook,
                                   action_repeat=k, envs=envs, start_trials=start_trials):
            for i, rec in enumerate(records):
                success[i, first + rec["episode"]] = rec["success"]

    if context == "own":
        play(agent, 0, adaptation)
    else:  # the expert's adaptation episodes, then the agent primed with them plays on, on the same environments
        trial_envs = make_trial_envs(tasks, 500, seed=seed, action_repeat=k)
        try:
            play(make_baseline("oracle"), 0, adaptation, envs=trial_envs)
            agent.start_trials(len(tasks), seed)
            agent.prime(obs_seen, actions_taken, reward[:, :adaptation].astype(np.float32), episode_index=adaptation)
            play(agent, adaptation, 0, start_trials=False, envs=trial_envs)
        finally:
            trial_envs.close()

    rows = []
    for i, task in enumerate(tasks):
        found = bool(success[i, :adaptation].any())
        e, t = np.unravel_index(reward[i, :adaptation].argmax(), (adaptation, steps))
        best = pos[i, e, min(t + 1, steps - 1)]  # where the best-rewarded decision led
        ev = pos[i, adaptation:]  # (E, T, 3)
        centre, top = top_centroid(pos[i, :adaptation], reward[i, :adaptation])
        rows.append({
            "env": task.env_name, "found": found, "kept": float(success[i, adaptation:].mean()),
            "best_to_goal_cm": 100 * float(np.linalg.norm(best - goal[i])),
            "top_steps": top, "top_centroid_to_goal_cm": 100 * float(np.linalg.norm(centre - goal[i])),
            "eval_closest_to_best_cm": 100 * float(np.linalg.norm(ev - best, axis=-1).min(axis=-1).mean()),
            "eval_closest_to_goal_cm": 100 * float(np.linalg.norm(ev - goal[i], axis=-1).min(axis=-1).mean()),
            "adapt_closest_to_goal_cm": 100 * float(np.linalg.norm(pos[i, :adaptation] - goal[i], axis=-1)
                                                    .min(axis=-1).mean()),
        })
    return {"agent": agent_dir, "envs": envs, "tasks_per_env": tasks_per_env, "adaptation": adaptation,
            "evaluation": evaluation, "seed": seed, "explore": list(explore), "wiped": wiped, "context": context,
            "trials": rows}


def table(result: dict) -> str:
    keys = ("best_to_goal_cm", "top_centroid_to_goal_cm", "top_steps", "eval_closest_to_best_cm",
            "eval_closest_to_goal_cm", "adapt_closest_to_goal_cm")
    out = ["| environment | trials that found a success | kept (evaluation success) | best step to goal, cm | "
           "mean of the top-rewarded steps to goal, cm | top-rewarded steps | "
           "evaluation episodes' closest approach to the best step, cm | ... to the goal, cm | adaptation episodes' "
           "closest approach to the goal, cm |", "|---|---|---|---|---|---|---|---|---|"]
    for env in result["envs"]:
        rows = [r for r in result["trials"] if r["env"] == env]
        found = [r for r in rows if r["found"]]
        med = lambda key: f"{np.median([r[key] for r in found]):.1f}" if found else "-"  # noqa: E731
        kept = f"{np.mean([r['kept'] for r in found]):.2f}" if found else "-"
        out.append(f"| {env} | {len(found)} of {len(rows)} | {kept} | " + " | ".join(med(k) for k in keys) + " |")
    return "\n".join(out) + "\n\nMedians over the trials that found a success (closest approach: per episode, then " \
        "the mean over the evaluation episodes)."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("agent", help="an in-context checkpoint directory")
    p.add_argument("--envs", nargs="+", default=list(EFFECTOR))
    p.add_argument("--tasks-per-env", type=int, default=10)
    p.add_argument("-K", "--adaptation-episodes", type=int, default=10)
    p.add_argument("-E", "--evaluation-episodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--explore", nargs=3, default=["10", "step", "0.5"], metavar=("EPISODES", "KIND", "SCALE"),
                   help="the acting rule of the adaptation episodes (default: the test split's, 10 step 0.5)")
    p.add_argument("--wiped", action="store_true", help="the agent's context wiped every episode (the control)")
    p.add_argument("--context", default="own", help="who plays the adaptation episodes: own (the agent) or expert "
                   "(the scripted expert told the goal; the agent reads them as its context)")
    p.add_argument("--out", required=True, help="directory for keep_check.json and keep_check.md")
    a = p.parse_args(argv)
    try:
        result = check(a.agent, a.envs, a.tasks_per_env, a.adaptation_episodes, a.evaluation_episodes, a.seed,
                       (int(a.explore[0]), a.explore[1], float(a.explore[2])), a.wiped, a.context)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "keep_check.json", result)
    what = ("its context wiped every episode (the control)" if a.wiped else "with its context" if a.context == "own"
            else "primed with the scripted expert's adaptation episodes (told the goal)")
    text = f"# Does the agent go back where it succeeded?\n\n`{a.agent}`, {what}, ML10 validation split\n\n{table(result)}\n"
    atomic_write_text(out / "keep_check.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
