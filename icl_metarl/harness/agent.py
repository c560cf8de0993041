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
