"""The agent protocol: how the evaluator sees every agent (in-context, gradient, baselines).

An agent plays a batch of parallel trials in lockstep. The evaluator calls, in this order:

    agent.start_trials(num_trials, seed)        # forget everything: new tasks
    for each episode of the trials:
        obs = env.reset()
        for each step:
            actions = agent.act(obs)            # (B, obs_dim) -> (B, act_dim)
            obs, reward, success = env.step(actions)
            agent.observe(reward, success)      # the transition's outcome, same order as act
        agent.end_episode()                     # a gradient agent adapts here; an in-context agent
                                                # only marks the boundary and keeps its memory

Only agents with ``privileged = True`` (the oracle expert) are handed the true goals, through
``act_privileged``; the evaluator chooses once, at the start, which of the two it calls.
Not for: training loops.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Privileged:
    """What only the oracle may see: each trial's environment name and true goal (B, 3)."""

    env_names: Sequence[str]
    goals: np.ndarray


class Agent(abc.ABC):
    """A policy that adapts across the episodes of a trial (or does not: the baselines)."""

    #: a short name for tables and plots
    name: str = "agent"
    #: True only for agents that are told the goal (the oracle); they are never learners
    privileged: bool = False
    #: the decision interval the agent was trained to act at (a checkpoint's); None: it acts at any
    #: interval the evaluation asks (the baselines)
    action_repeat: int | None = None

    @abc.abstractmethod
    def start_trials(self, num_trials: int, seed: int) -> None:
        """Start ``num_trials`` new trials: forget all context or adapted weights."""

    @abc.abstractmethod
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions (B, act_dim) in [-1, 1] for observations (B, obs_dim) of the current step."""

    def act_privileged(self, obs: np.ndarray, privileged: Privileged) -> np.ndarray:
        """``act`` for privileged agents, with the true goals."""
        raise NotImplementedError(f"{type(self).__name__} is not a privileged agent")

    def observe(self, reward: np.ndarray, success: np.ndarray) -> None:
        """The outcome (B,) of the actions last returned by ``act``."""

    def end_episode(self) -> None:
        """The current episode of every trial has ended; the next ``act`` starts a new one."""

    def fork(self) -> "Agent":
        """A second agent with the same settings and weights, to play another group of trials at the
        same time (the evaluator's pipelined mode); the two share read-only weights. The default, a
        shallow copy, is right for every agent whose ``start_trials`` makes all per-trial state anew
        (rebinds, never mutates in place): true of the agents here, checked by the pipelined-against-
        sync test of each."""
        return copy.copy(self)

    def describe(self) -> dict:
        """JSON-able facts about the agent for results files (checkpoint, training pool, ...)."""
        return {"name": self.name, "type": type(self).__name__}


class ReplayBest(Agent):
    """``agent`` plays the first ``adaptation_episodes`` episodes of each trial; every later episode replays,
    open loop, the actions of that trial's highest-return adaptation episode (the first of a tie).

    A memory with no learning: a trial's episodes start from one state and the simulator is deterministic,
    so the replay scores exactly what the chosen episode scored (``scripts/replay_check.py``), and the
    evaluation episodes measure what the agent *found* while adapting, kept perfectly. It reads returns
    only, as any meta-RL agent may. The evaluator's ``--replay-best`` variant of every agent."""

    def __init__(self, agent: Agent, adaptation_episodes: int):
        if adaptation_episodes < 1:
            raise ValueError(f"replay-best needs at least 1 adaptation episode, got {adaptation_episodes}")
        self.agent, self.adaptation_episodes = agent, int(adaptation_episodes)
        self.name = f"{agent.name} [replay-best]"
        self.privileged, self.action_repeat = agent.privileged, agent.action_repeat

    def start_trials(self, num_trials: int, seed: int) -> None:
        self.agent.start_trials(num_trials, seed)
        self._episode, self._t = 0, 0
        self._actions: list[list[np.ndarray]] = [[]]  # per adaptation episode, its decisions' actions (B, A)
        self._returns = [np.zeros(num_trials)]
        self._replay: np.ndarray | None = None  # (decisions, B, A) once the adaptation episodes are over

    def _acting(self) -> bool:
        return self._episode < self.adaptation_episodes

    def _record(self, action: np.ndarray) -> np.ndarray:
        self._actions[-1].append(np.array(action, np.float32, copy=True))
        return action

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self._acting():
            return self._record(self.agent.act(obs))
        return self._replayed()

    def act_privileged(self, obs: np.ndarray, privileged: Privileged) -> np.ndarray:
        if self._acting():
            return self._record(self.agent.act_privileged(obs, privileged))
        return self._replayed()

    def _replayed(self) -> np.ndarray:
        if self._t >= len(self._replay):
            raise RuntimeError(f"replay-best: an evaluation episode is longer than the adaptation episodes "
                               f"({len(self._replay)} decisions)")
        action = self._replay[self._t]
        self._t += 1
        return action.copy()

    def observe(self, reward: np.ndarray, success: np.ndarray) -> None:
        if self._acting():
            self._returns[-1] += np.asarray(reward, np.float64)
            self.agent.observe(reward, success)

    def end_episode(self) -> None:
        if self._acting():
            self.agent.end_episode()
            self._episode += 1
            if self._acting():
                self._actions.append([])
                self._returns.append(np.zeros_like(self._returns[0]))
            else:  # choose each trial's episode; keep only its actions
                best = np.argmax(np.stack(self._returns), axis=0)  # (B,)
                lengths = {len(a) for a in self._actions}
                if len(lengths) != 1:
                    raise RuntimeError(f"replay-best: adaptation episodes of different lengths {sorted(lengths)}")
                actions = np.stack([np.stack(a) for a in self._actions])  # (K, decisions, B, A)
                self._replay = actions[best, :, np.arange(len(best))].transpose(1, 0, 2)  # (decisions, B, A)
                self._actions = []
        else:
            self._episode += 1
        self._t = 0

    def fork(self) -> "Agent":
        return ReplayBest(self.agent.fork(), self.adaptation_episodes)

    def describe(self) -> dict:
        return {**self.agent.describe(), "name": self.name, "replay_best_after": self.adaptation_episodes}
