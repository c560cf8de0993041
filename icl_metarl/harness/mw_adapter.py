"""Presents any ``Agent`` to Meta-World's own ``metaworld.evaluation.metalearning_evaluation``, so our
evaluator's figures can be checked against the benchmark's reference code on the same tasks.

Not for: producing the toolkit's figures (``evaluation.py`` does that, with per-episode records).

How the two protocols meet: Meta-World calls ``init`` once per round (a new trial: we call
``start_trials``), ``adapt_action``/``step`` during the adaptation episodes, ``adapt`` once, then
``eval_action`` and ``reset(done_mask)`` after *every* step of the evaluation episodes, with
``terminate_on_success`` on. ``reset`` is an episode boundary, never a new trial, so an in-context agent
keeps its memory. Meta-World hands the agent neither rewards during evaluation nor success flags at all,
so a vector-env wrapper passes each step's outcome to ``agent.observe`` as our evaluator does.

An agent with a decision interval k (``agent.action_repeat``) is asked for an action every k-th
simulator step of an episode and the adapter holds it in between; the k steps' summed reward and any
success reach ``agent.observe`` once, as ``TrialEnv`` hands them to our evaluator.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import gymnasium as gym
import metaworld
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.evaluation import metalearning_evaluation

from icl_metarl.harness.agent import Agent, Privileged
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.suites import TaskSpec, check_action_repeat, check_episode_length, metaworld_task


def metaworld_vector_env(tasks: Sequence[TaskSpec], episode_length: int, env_seeds: Sequence[int],
                         vector: str = "sync") -> gym.vector.VectorEnv:
    """Meta-World's own wrapper stack (as ``metaworld.make_ml_envs`` builds it), one sub-env per task.

    Each sub-env holds exactly one task, so ``sample_tasks`` always picks it: the tasks are ours, in
    our order, not Meta-World's pseudo-random draw.
    """

    check_episode_length(episode_length)
    if episode_length > 500:
        raise UsageError(f"Meta-World environments stop at 500 steps, got episode length {episode_length}")
    fns = []
    for task, seed in zip(tasks, env_seeds, strict=True):
        cls = ALL_V3_ENVIRONMENTS[task.env_name]
        mw_task = metaworld_task(task)
        # _init_each_env is the function make_ml_envs uses for every sub-env; calling it keeps the stack
        # (TimeLimit, terminate-on-success, RecordEpisodeStatistics, task select) exactly Meta-World's.
        fns.append(partial(metaworld._init_each_env, env_cls=cls, tasks=[mw_task], seed=int(seed),
                           max_episode_steps=episode_length, terminate_on_success=False,
                           task_select="pseudorandom"))
    vec = {"sync": gym.vector.SyncVectorEnv, "async": gym.vector.AsyncVectorEnv}[vector]
    return vec(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


class _Outcomes(gym.vector.VectorWrapper):
    """Hands every step's reward and success to the adapter (Meta-World's loop does not pass them)."""

    def __init__(self, env: gym.vector.VectorEnv, adapter: "MetaWorldAdapter"):
        super().__init__(env)
        self._adapter = adapter

    def step(self, actions):
        obs, reward, terminated, truncated, infos = self.env.step(actions)
        self._adapter._observe(np.asarray(reward, dtype=np.float64), _step_success(infos, terminated | truncated))
        return obs, reward, terminated, truncated, infos

    # Meta-World's evaluation talks to the sub-envs through these; VectorWrapper does not forward them.
    def call(self, name, *args, **kwargs):
        return self.env.call(name, *args, **kwargs)

    def get_attr(self, name):
        return self.env.get_attr(name)


def _step_success(infos: dict, done: np.ndarray) -> np.ndarray:
    """This step's success flags under SAME_STEP autoreset: a finished sub-env's are in final_info."""
    success = np.zeros(len(done))
    if "success" in infos:
        mask = infos.get("_success", np.ones(len(done), dtype=bool))
        success[mask] = np.asarray(infos["success"], dtype=np.float64)[mask]
    if "final_info" in infos and "success" in infos["final_info"]:
        final = infos["final_info"]
        mask = np.asarray(final["_success"], dtype=bool)
        success[mask] = np.asarray(final["success"], dtype=np.float64)[mask]
    return success


class MetaWorldAdapter:
    """Meta-World's ``MetaLearningAgent`` around one of our agents; build it with ``wrap``."""

    def __init__(self, agent: Agent, seed: int = 0):
        self.agent = agent
        self.seed = int(seed)
        self.action_repeat = check_action_repeat(getattr(agent, "action_repeat", None) or 1)
        self.rounds = 0
        self.envs: gym.vector.VectorEnv | None = None
        self._open = np.zeros(0, dtype=bool)  # trials whose current episode has had at least one step
        self._held: np.ndarray | None = None  # the action of the current decision, held for k steps
        self._since = 0  # simulator steps played with it
        self._reward = self._success = None  # their summed reward and any success, not yet observed

    def wrap(self, envs: gym.vector.VectorEnv) -> gym.vector.VectorEnv:
        """The vector env to hand to ``metalearning_evaluation`` together with this adapter."""
        self.envs = _Outcomes(envs, self)
        return self.envs

    # --- Meta-World's MetaLearningAgent protocol
    def init(self) -> None:
        self.agent.start_trials(self.envs.num_envs, self.seed + self.rounds)
        self.rounds += 1
        self._open = np.zeros(self.envs.num_envs, dtype=bool)

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict]:
        return self._act(observations), {}

    def step(self, timestep) -> None:
        self._end(np.logical_or(timestep.terminated, timestep.truncated))

    def adapt(self) -> None:
        pass  # our agents adapt in end_episode, already called at the end of every adaptation episode

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        return self._act(observations)

    def reset(self, env_mask: np.ndarray) -> None:
        self._end(np.asarray(env_mask, dtype=bool))

    # --- our protocol
    def _act(self, obs: np.ndarray) -> np.ndarray:
        if self._held is not None:  # inside a decision: hold its action
            self._open[:] = True
            return self._held
        if self.agent.privileged:
            names = _task_names(self.envs)
            goals = np.stack(self.envs.call("_get_pos_goal"))  # (B, 3), read from the env, never shown to learners
            actions = self.agent.act_privileged(obs, Privileged(names, goals))
        else:
            actions = self.agent.act(obs)
        self._open[:] = True
        self._held, self._since = np.asarray(actions, dtype=np.float32), 0
        self._reward, self._success = np.zeros(len(self._held)), np.zeros(len(self._held))
        return self._held

    def _observe(self, reward: np.ndarray, success: np.ndarray) -> None:
        self._reward = self._reward + reward
        self._success = np.maximum(self._success, success)
        self._since += 1
        if self._since == self.action_repeat:
            self._flush()

    def _flush(self) -> None:
        """The current decision is over: its outcome to the agent, and the next step asks anew."""
        if self._held is not None:
            self.agent.observe(self._reward, self._success)
            self._held = None

    def _end(self, done: np.ndarray) -> None:
        done = done & self._open  # Meta-World also calls reset(all) before evaluation: not a new boundary
        if not done.any():
            return
        self._flush()  # an episode's last decision may hold fewer than k steps
        if done.all():
            self.agent.end_episode()
        elif hasattr(self.agent, "end_episodes"):
            self.agent.end_episodes(done)
        else:
            raise UsageError(
                f"agent {self.agent.name!r} ends episodes in lockstep only, but Meta-World ended them in "
                f"{int(done.sum())} of {len(done)} trials (terminate_on_success); play one task per "
                f"vector env (evaluate_with_metaworld does) or give the agent end_episodes(done)"
            )
        self._open[done] = False


def _task_names(envs: gym.vector.VectorEnv) -> list[str]:
    by_class = {cls.__name__: name for name, cls in ALL_V3_ENVIRONMENTS.items()}
    return [by_class[c] for c in envs.get_attr("task_name")]


def evaluate_with_metaworld(agent: Agent, tasks: Sequence[TaskSpec], env_seeds: Sequence[int],
                            adaptation_episodes: int = 10, evaluation_episodes: int = 3,
                            episode_length: int = 500, seed: int = 0, one_task_per_call: bool = True) -> dict:
    """Meta-World's ``metalearning_evaluation`` on our tasks, one round (one trial per task).

    ``one_task_per_call=True`` calls it once per task with a one-env vector env: its bookkeeping counts
    the first E episodes *per environment name*, so with one sub-env they are exactly that trial's E
    episodes. ``False`` puts all tasks in one vector env as ``make_ml_envs`` does, and reproduces the
    upstream bookkeeping (the first E episodes to end among all sub-envs of a name; see docs/results.md).
    Returns the mean success Meta-World reports and, per call, its figure.
    """
    groups = [[i] for i in range(len(tasks))] if one_task_per_call else [list(range(len(tasks)))]
    per_call = []
    for group in groups:
        adapter = MetaWorldAdapter(agent, seed=seed + group[0])
        envs = adapter.wrap(metaworld_vector_env([tasks[i] for i in group], episode_length,
                                                 [env_seeds[i] for i in group]))
        try:
            mean_success, mean_return, per_name = metalearning_evaluation(
                adapter, envs, num_evals=1, adaptation_episodes=adaptation_episodes,
                evaluation_episodes=evaluation_episodes)
        finally:
            envs.close()
        per_call.append({"tasks": group, "success": float(mean_success), "return": float(mean_return),
                         "per_env_name": {k: float(v) for k, v in per_name.items()}})
    return {"success": float(np.mean([c["success"] for c in per_call])), "calls": per_call}
