"""The noise that makes the histories' expert an improving learner: schedules, perturbation, the agent.

A schedule gives each episode of a trial a noise level, annealed from ``noise_max`` to none; the noisy
expert (the scripted expert told the true goal) acts at that level. Not for: which tasks are played
(``task_pools.py``) or recording and storing the trials (``recording.py``, ``histories.py``).
"""

from __future__ import annotations

import numpy as np

from icl_metarl.harness.agent import Agent, Privileged
from icl_metarl.harness.errors import choice_error
from icl_metarl.harness.suites import GoalOffsets, expert_actions
from icl_metarl.incontext.config import NOISE_KINDS, NOISE_SCHEDULES


def noise_levels(schedule: str, episodes: int, noise_max: float) -> np.ndarray:
    """Noise level of each episode of a trial, from ``noise_max`` in the first to 0 in the last: (K,).

    The 'random' schedule has no fixed levels (see ``trial_noise_levels``); its (K,) are all NaN.
    """
    if schedule == "random":
        return np.full(episodes, np.nan)
    frac = np.arange(episodes, dtype=np.float64) / max(episodes - 1, 1)  # 0 .. 1
    if schedule == "linear":
        return noise_max * (1.0 - frac)
    if schedule == "cosine":
        return noise_max * 0.5 * (1.0 + np.cos(np.pi * frac))
    if schedule == "none":
        return np.zeros(episodes)
    raise choice_error("noise schedule", schedule, NOISE_SCHEDULES)


def trial_noise_levels(schedule: str, trials: int, episodes: int, noise_max: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Noise level of every episode of every trial: (T, K); only 'random' draws from ``rng``."""
    if schedule == "random":
        return noise_max * rng.random((trials, episodes))
    return np.broadcast_to(noise_levels(schedule, episodes, noise_max)[None, :], (trials, episodes))


def perturb(expert: np.ndarray, kind: str, level, rng: np.random.Generator) -> np.ndarray:
    """The action taken: the expert's (B, 4) perturbed at ``level`` (a float or one per row, (B,));
    draws the same randoms at any level."""
    level = np.asarray(level, dtype=np.float64)
    if kind == "uniform":
        replace = rng.random(expert.shape[0]) < level  # (B,)
        random = rng.uniform(-1.0, 1.0, expert.shape)
        return np.where(replace[:, None], random, expert).astype(np.float32)
    if kind == "gaussian":
        scale = level[:, None] if level.ndim else level
        return np.clip(expert + scale * rng.standard_normal(expert.shape), -1.0, 1.0).astype(np.float32)
    raise choice_error("noise kind", kind, NOISE_KINDS)


class NoisyExpertAgent(Agent):
    """The scripted expert told the true goal, perturbed per ``kind`` at each trial's level for the
    episode (``trial_noise_levels``): the learner whose improving trials histories record.

    Here, not among the harness's baselines: its noise kinds and schedules are the histories' settings
    and it serves only their generation. All its randoms come from one Generator seeded by
    ``start_trials``, drawn in a fixed order (levels, goal offsets, then each step's perturbation): a
    shard's bytes depend on that order.
    """

    name = "noisy-expert"
    privileged = True

    def __init__(self, kind: str, schedule: str, noise_max: float, episodes: int,
                 goal_offsets: GoalOffsets | None = None, action_noise: float = 0.0):
        self.kind, self.schedule, self.noise_max, self.episodes = kind, schedule, noise_max, episodes
        self.action_noise = action_noise  # DART: Gaussian noise on every executed action, on top of kind
        self.goal_offsets = goal_offsets or {}  # the configuration's expert corrections, parsed

    def start_trials(self, num_trials: int, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._levels = trial_noise_levels(self.schedule, num_trials, self.episodes, self.noise_max, self._rng)  # (T, K)
        if self.kind == "goal":  # drawn only for this kind, so the other kinds' random streams stay as they were
            normal = self._rng.standard_normal((self.episodes, num_trials, 3))  # (K, T, 3)
            self._goal_offsets = self._levels.T[:, :, None] * normal  # (K, T, 3)
        self._episode = 0
        self._labelled = (None, None)  # (obs, the expert's action there told the true goal)

    def act(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the noisy expert acts only through act_privileged (it must be told the goal)")

    def act_privileged(self, obs: np.ndarray, privileged: Privileged) -> np.ndarray:
        k = self._episode
        if self.kind == "goal":
            action = expert_actions(privileged.env_names, obs, privileged.goals + self._goal_offsets[k],
                                    self.goal_offsets)
        else:
            expert = self.label(privileged.env_names, obs, privileged.goals)  # (T, 4)
            action = perturb(expert, self.kind, self._levels[:, k], self._rng)
        if self.action_noise:  # drawn after the kind's randoms, so data without it keeps its bytes
            action = perturb(action, "gaussian", self.action_noise, self._rng)
        return action

    def label(self, env_names, obs: np.ndarray, goals: np.ndarray) -> np.ndarray:
        """The expert's action told the true goal (the histories' label): computed once per observation
        when this agent already computed it to perturb it (uniform and gaussian noise)."""
        if self._labelled[0] is not obs:
            self._labelled = (obs, expert_actions(env_names, obs, goals, self.goal_offsets))
        return self._labelled[1]

    def end_episode(self) -> None:
        self._episode += 1
