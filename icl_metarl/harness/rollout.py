"""The one rollout loop: an agent plays a batch of trials in lockstep, episode after episode. Everything
that plays episodes (evaluator, history generation, policy-gradient sampler, suite check, probes) plays
them through ``play_trials``. Not for: choosing tasks or seeds (``evaluation.py``), acting (``agent.py``).
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import numpy as np

from icl_metarl.harness.agent import Agent, Privileged
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.pipeline import EnvGroupWorker, InProcessEnvs, split_in_two
from icl_metarl.harness.suites import ACT_DIM, TaskSpec, check_action_repeat, decisions_per_episode, make_trial_envs
from icl_metarl.harness.suites import VECTOR_MODES as ENV_VECTOR_MODES

#: how a batch's environments run: gymnasium's sync/async vector envs, or two worker groups overlapped
#: with the agent's steps (``pipeline.py``)
VECTOR_MODES = (*ENV_VECTOR_MODES, "pipelined")


class StepHook(Protocol):
    """Sees every environment step: ``obs`` and ``info`` are what ``actions`` were chosen on (before the
    step); ``reward`` and ``success`` (B,) are the step's outcome."""

    def __call__(self, episode: int, t: int, obs: np.ndarray, info: dict, actions: np.ndarray,
                 reward: np.ndarray, success: np.ndarray) -> None: ...


def play_trials(
    agent: Agent,
    tasks: Sequence[TaskSpec],
    env_seed: int,
    agent_seed: int,
    adaptation_episodes: int,
    evaluation_episodes: int,
    episode_length: int,
    vector: str = "sync",
    progress=None,
    on_step: StepHook | None = None,
    envs=None,
    start_trials: bool = True,
    action_repeat: int = 1,
) -> Iterator[list[dict]]:
    """Play one trial per task in lockstep; yield, after each episode, one record per trial.

    A record: episode index, phase, success (``info["success"]`` ever 1), return, and the 1-based step
    of the first success (None if none). Episodes run their full length whatever happens, so the
    success of an episode does not change how long the agent's later episodes are.

    ``vector="pipelined"``: the trials are split into two groups (``pipeline.split_in_two``), each with
    its environments in a worker process and its own copy of the agent; while one group's environments
    step, the other group's actions are computed. Group g plays exactly as this function would play its
    tasks alone with ``env_seed + offset`` and ``agent_seed + offset`` (offset: its first trial's index),
    which is what the evaluator does for consecutive batches: the records equal those of a sync run
    with batches of half the size.

    ``on_step`` (not with pipelined: two groups have no single step order) sees every step. ``envs``: a
    sync vector env of exactly ``tasks`` (``make_trial_envs``) built by the caller, who reuses and closes
    it; each episode resets it, and ``env_seed`` is unused (it was seeded when built). ``start_trials=False``:
    the caller has started or primed the agent, whose state is kept. Settings are checked at the call.

    ``action_repeat`` k (the decision interval): the agent acts every k-th simulator step and its action
    is held in between; ``episode_length`` still counts simulator steps, success still counts at any
    simulator step, and ``steps_to_success`` is the simulator step of the first success. The agent then
    sees ceil(episode_length / k) decisions per episode, each with the summed reward of its steps.
    """
    check_action_repeat(action_repeat)
    if vector not in VECTOR_MODES:
        raise choice_error("vector mode", vector, VECTOR_MODES)
    if vector == "pipelined" and (on_step is not None or envs is not None or not start_trials):
        raise UsageError("on_step, envs= and start_trials=False need one group of trials: vector 'sync' or "
                         "'async', not 'pipelined'")
    if envs is not None:
        if vector != "sync":
            raise UsageError(f"envs= is a sync vector env; vector must be 'sync', got {vector!r}")
        built = [t.task for t in envs.envs]
        if built != list(tasks):
            raise UsageError(f"envs= plays {len(built)} trials of other tasks than the {len(tasks)} given")
        repeats = {t.action_repeat for t in envs.envs}
        if repeats != {action_repeat}:
            raise UsageError(f"envs= holds its actions for {sorted(repeats)} simulator steps, the call asks "
                             f"action_repeat={action_repeat}")
    return _play_trials(agent, tasks, env_seed, agent_seed, adaptation_episodes, evaluation_episodes,
                        episode_length, vector, progress, on_step, envs, start_trials, action_repeat)


def _play_trials(agent, tasks, env_seed, agent_seed, adaptation_episodes, evaluation_episodes, episode_length,
                 vector, progress, on_step, envs, start_trials, action_repeat) -> Iterator[list[dict]]:
    groups = trial_groups(agent, tasks, vector)
    if envs is not None:  # the caller's: reused across calls, so not closed here
        yield from play_lockstep(groups, [InProcessEnvs(envs)], agent_seed, adaptation_episodes,
                                 evaluation_episodes, episode_length, progress, on_step, start_trials, action_repeat)
        return
    built = []
    try:
        for _, group_tasks, offset in groups:  # workers start (import Meta-World) in parallel
            built.append(make_group_envs(group_tasks, episode_length, env_seed + offset, vector, action_repeat))
        yield from play_lockstep(groups, built, agent_seed, adaptation_episodes, evaluation_episodes,
                                 episode_length, progress, on_step, start_trials, action_repeat)
    finally:
        for env in built:
            env.close()


def trial_groups(agent: Agent, tasks: Sequence[TaskSpec], vector: str) -> list[tuple[Agent, list[TaskSpec], int]]:
    """The (agent, tasks, offset of its first trial) groups a batch is played in: one group, or for
    ``pipelined`` two halves, the second played by ``agent.fork()`` (its own context or adapted weights)."""
    if vector not in VECTOR_MODES:
        raise choice_error("vector mode", vector, VECTOR_MODES)
    if vector != "pipelined":
        return [(agent, list(tasks), 0)]
    return [(agent if g == 0 else agent.fork(), list(tasks[s]), s.start)
            for g, s in enumerate(split_in_two(len(tasks)))]


def make_group_envs(tasks: list[TaskSpec], episode_length: int, seed: int, vector: str, action_repeat: int = 1):
    """The environments of one group of trials: a worker process (pipelined) or a vector env here."""
    if vector == "pipelined":
        return EnvGroupWorker(tasks, episode_length, seed, action_repeat)
    return InProcessEnvs(make_trial_envs(tasks, episode_length, seed=seed, mode=vector, action_repeat=action_repeat))


def play_lockstep(groups, envs, agent_seed: int, adaptation_episodes: int, evaluation_episodes: int,
                  episode_length: int, progress=None, on_step: StepHook | None = None,
                  start_trials: bool = True, action_repeat: int = 1) -> Iterator[list[dict]]:
    """The lockstep loop of ``play_trials`` on groups of (agent, tasks, offset) and their built
    environments (``make_group_envs``, built with the same ``action_repeat``), which the caller closes;
    one group is the plain lockstep loop. ``on_step`` sees decision indices t."""
    decisions = decisions_per_episode(episode_length, action_repeat)
    for (agent, tasks, offset), env in zip(groups, envs):
        env.wait_started()
        if start_trials:
            agent.start_trials(len(tasks), agent_seed + offset)
    n = [len(tasks) for _, tasks, _ in groups]
    names = [[t.env_name for t in tasks] for _, tasks, _ in groups]
    # what each group's pending actions were chosen on, for on_step: (obs, info, actions)
    chosen: list[tuple] = [()] * len(groups)

    def act(g: int, obs, info) -> np.ndarray:
        agent = groups[g][0]
        if agent.privileged:
            actions = agent.act_privileged(obs, Privileged(names[g], np.asarray(info["goal"])))
        else:
            actions = agent.act(obs)
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (n[g], ACT_DIM):
            raise ValueError(f"agent returned actions of shape {actions.shape} (want {(n[g], ACT_DIM)})")
        if not np.all(np.isfinite(actions)):
            raise ValueError(f"agent returned non-finite actions ({int((~np.isfinite(actions)).sum())} of "
                             f"{actions.size} values NaN or inf): its weights have diverged")
        chosen[g] = (obs, info, actions)
        return actions

    for episode in range(adaptation_episodes + evaluation_episodes):
        ret = [np.zeros(k) for k in n]
        first = [np.zeros(k, dtype=np.int64) for k in n]  # 0 = no success yet
        for env in envs:
            env.reset_async()
        for g, env in enumerate(envs):
            obs, info = env.reset_wait()
            env.step_async(act(g, obs, info))
        for t in range(decisions):
            for g, env in enumerate(envs):
                obs, reward, _, _, info = env.step_wait()
                reward = np.asarray(reward, dtype=np.float64)
                success = np.asarray(info["success"], dtype=np.float64)
                groups[g][0].observe(reward, success)
                if on_step is not None:
                    on_step(episode, t, *chosen[g], reward, success)
                ret[g] += reward
                sim_step = t * action_repeat + np.asarray(info["success_substep"], dtype=np.int64)
                first[g] = np.where((first[g] == 0) & (success >= 1.0), sim_step, first[g])
                if t + 1 < decisions:  # the other groups' environments step meanwhile
                    env.step_async(act(g, obs, info))
            if progress is not None:
                progress.update(sum(n) * min(action_repeat, episode_length - t * action_repeat))
        for agent, _, _ in groups:
            agent.end_episode()
        phase = "adaptation" if episode < adaptation_episodes else "evaluation"
        yield [
            {
                "episode": episode,
                "phase": phase,
                "success": bool(f[i] > 0),
                "return": float(r[i]),
                "steps_to_success": int(f[i]) if f[i] > 0 else None,
            }
            for r, f in zip(ret, first)
            for i in range(len(r))
        ]
