"""Reference agents that bracket every learner: uniform random actions (the floor) and the scripted
expert told the true goal (the ceiling). Both are memoryless, so they need no adaptation; ``icl-metarl
suites NAME --check N`` plays the two through the evaluator as a suite's smoke test.

Not for: learners; the non-adaptive variants of learners live with the learners (``load_agent``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from icl_metarl.harness.agent import Agent, Privileged
from icl_metarl.harness.errors import choice_error
from icl_metarl.harness.settings import COMMAS
from icl_metarl.harness.suites import ACT_DIM, expert_actions, parse_goal_offsets


class RandomAgent(Agent):
    """Uniform random actions in [-1, 1]; seeded by ``start_trials`` so a run repeats exactly."""

    name = "random"

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)
        self._num_trials = 0

    def start_trials(self, num_trials: int, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._num_trials = int(num_trials)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self._rng.uniform(-1.0, 1.0, (len(obs), ACT_DIM)).astype(np.float32)

    def end_episodes(self, done: np.ndarray) -> None:
        """Episodes may end in some trials only (Meta-World's evaluation); nothing to remember."""

    def describe(self) -> dict:
        return {**super().describe(), "task_pool": "none (baseline, not trained)"}


class OracleAgent(Agent):
    """Meta-World's scripted expert for each trial's environment, handed the true goal: the ceiling."""

    name = "oracle"
    privileged = True

    def __init__(self, expert_goal_offsets: Sequence[str] = ()):
        """``expert_goal_offsets``: the study's ``ENV=x,y,z`` corrections (``suites.parse_goal_offsets``)."""
        self.expert_goal_offsets = tuple(expert_goal_offsets)
        self._offsets = parse_goal_offsets(self.expert_goal_offsets)

    def start_trials(self, num_trials: int, seed: int) -> None:
        pass  # deterministic and memoryless

    def act(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the oracle acts only through act_privileged (it must be told the goal)")

    def act_privileged(self, obs: np.ndarray, privileged: Privileged) -> np.ndarray:
        return expert_actions(privileged.env_names, obs, privileged.goals, self._offsets)

    def end_episodes(self, done: np.ndarray) -> None:
        """Episodes may end in some trials only (Meta-World's evaluation); nothing to remember."""

    def describe(self) -> dict:
        return {**super().describe(), "task_pool": "none (scripted expert told the goal)",
                "expert_goal_offsets": list(self.expert_goal_offsets)}


BASELINES = {"random": RandomAgent, "oracle": OracleAgent}


@dataclass
class BaselineOptions:
    """How an evaluated baseline acts (None: its default)."""

    expert_goal_offsets: tuple[str, ...] | None = field(default=None, metadata={COMMAS: False})
    """oracle: ENV=x,y,z corrections of the goal the scripted expert is told (metres), as the study's
    histories used them (e.g. reach-v3=0,0,0.045: aim the TCP, not the hand; suites.MEASURED_GOAL_OFFSETS)"""


def make_baseline(name: str, expert_goal_offsets: Sequence[str] = ()) -> Agent:
    """A baseline agent by name: ``random`` or ``oracle`` (told the goal shifted by ``expert_goal_offsets``)."""
    if name not in BASELINES:
        raise choice_error("baseline", name, BASELINES)
    return OracleAgent(expert_goal_offsets) if name == "oracle" else BASELINES[name]()
