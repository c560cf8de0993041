"""Meta-World task suites shared by both learners: task lists, trial environments, scripted experts.

A suite name (``ML1:reach-v3``, ``ML10``, ``ML45``), a split and a seed give a deterministic list of
``TaskSpec`` (environment name + Meta-World's random vector, JSON-serialisable). Trial environments
play one task for many episodes with the goal hidden; the true goal travels only in ``info["goal"]``,
which only the expert (and the oracle baseline) may read. Not for: agents, data, evaluation.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import gymnasium as gym
import metaworld
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from metaworld import env_dict
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.policies import ENV_POLICY_MAP

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import atomic_write_json, versions

#: validation: new tasks of the train environments (not the benchmark's), for choosing recipes, budgets and
#: checkpoints; the test split is then played once per final recipe
SPLITS = ("train", "validation", "test")
#: task pools: the split's benchmark tasks, a new task per trial/draw, or (a count) N distinct new tasks
POOL_WORDS = ("benchmark", "fresh")
OBS_DIM = 39
ACT_DIM = 4
DEFAULT_EPISODE_LENGTH = 500


# --------------------------------------------------------------------------------------------- suites
@dataclass(frozen=True)
class TaskSpec:
    """One Meta-World task: an environment and one of its goal/object variations."""

    env_name: str
    rand_vec: tuple[float, ...]

    def to_json(self) -> dict:
        return {"env_name": self.env_name, "rand_vec": list(self.rand_vec)}

    @staticmethod
    def from_json(d: dict) -> "TaskSpec":
        return TaskSpec(str(d["env_name"]), tuple(float(x) for x in d["rand_vec"]))


@dataclass(frozen=True)
class Suite:
    """A Meta-World ML benchmark: its name and the environments of each split.

    A hold-out suite (``ML10-holdout``, ``ML45-holdout``) is its benchmark with some train environments
    set aside as validation environments: train on the rest, choose the recipe on the held-out ones,
    then retrain on the full benchmark for the test figure (its own test split is never played).
    """

    name: str
    train_envs: tuple[str, ...]
    test_envs: tuple[str, ...]
    validation_envs: tuple[str, ...] = ()
    """environments of the validation split when they are held out of training (empty: the train ones)"""

    @property
    def benchmark(self) -> str:
        """The Meta-World benchmark whose tasks this suite plays."""
        return self.name.removesuffix(HOLDOUT)

    @property
    def holds_out(self) -> bool:
        return bool(self.validation_envs)

    def envs(self, split: str) -> tuple[str, ...]:
        check_split(split)
        if split == "validation" and self.holds_out:
            return self.validation_envs
        return self.test_envs if split == "test" else self.train_envs

    def tasks(self, split: str, seed: int = 0) -> list[TaskSpec]:
        """The tasks of a split, the same for the same seed: the benchmark's train or test tasks in
        Meta-World's order (train: of this suite's train environments), or the validation tasks: new
        tasks of the validation environments, round-robin over them, none a benchmark train or test task
        (as many as the benchmark's train split holds, or 50 per held-out environment)."""
        check_split(split)
        if split == "validation":
            return list(_validation_tasks(self.name, int(seed)))
        tasks = [TaskSpec.from_json(t) for t in _benchmark_tasks(self.benchmark, int(seed))[split]]
        return [t for t in tasks if t.env_name in self.envs(split)]

    def training_exclusions(self, seed: int = 0) -> list[TaskSpec]:
        """Tasks no training pool may hold: the test and the validation tasks."""
        return self.tasks("test", seed) + self.tasks("validation", seed)


#: the suffix of a hold-out suite's name
HOLDOUT = "-holdout"
#: train environments the hold-out suites set aside for validation; each shares a skill with an environment
#: that stays in training, as every test environment does (ML10: drawer-open with drawer-close, ...)
VALIDATION_ENVS = {
    "ML10": ("window-open-v3", "basketball-v3"),
    "ML45": ("window-close-v3", "button-press-wall-v3", "plate-slide-back-side-v3", "handle-pull-side-v3",
             "stick-pull-v3"),
}
#: new tasks per held-out environment in a hold-out suite's validation split (the benchmark's 50 per env)
VALIDATION_TASKS_PER_ENV = 50


@lru_cache(maxsize=1)
def _env_names() -> tuple[str, ...]:
    return tuple(sorted(ALL_V3_ENVIRONMENTS))


def env_names() -> list[str]:
    """All 50 Meta-World v3 environment names."""
    return list(_env_names())


def suite_names() -> list[str]:
    """Every suite name this toolkit accepts."""
    return ["ML10", "ML45"] + [b + HOLDOUT for b in VALIDATION_ENVS] + [f"ML1:{e}" for e in env_names()]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise choice_error("split", split, SPLITS)
    return split


def check_playable(suite_name: str, split: str) -> str:
    """A split agents may be played on: any, except the test split of a hold-out suite (whose agents never
    trained on its validation environments; the test figure comes from a retrain on the full benchmark)."""
    suite = get_suite(suite_name)
    check_split(split)
    if split == "test" and suite.holds_out:
        raise UsageError(f"suite {suite.name} holds out {', '.join(suite.validation_envs)} to choose a recipe on "
                         f"its validation split; the test figure comes from agents retrained on all train "
                         f"environments: use --suite {suite.benchmark} for the test split")
    return split


def get_suite(name: str) -> Suite:
    """Parse a suite name: ``ML1:<env>-v3``, ``ML10`` or ``ML45``."""
    if not isinstance(name, str):
        raise UsageError(f"suite name must be a string, got {name!r}")
    if name.upper().startswith("ML1:"):
        env = name.split(":", 1)[1]
        if env not in env_dict.ALL_V3_ENVIRONMENTS:
            raise choice_error("Meta-World environment", env, env_names())
        return Suite(f"ML1:{env}", (env,), (env,))
    table = {"ML10": env_dict.ML10_V3, "ML45": env_dict.ML45_V3}
    key = name.upper().replace(HOLDOUT.upper(), HOLDOUT)
    base = key.removesuffix(HOLDOUT)
    if base in table:
        d = table[base]
        if key == base:
            return Suite(base, tuple(d["train"]), tuple(d["test"]))
        held = VALIDATION_ENVS[base]
        return Suite(key, tuple(e for e in d["train"] if e not in held), tuple(d["test"]), held)
    raise UsageError(
        f"unknown suite {name!r}; valid: ML10, ML45, ML10-holdout, ML45-holdout, or ML1:<env> with env one "
        f"of the 50 v3 environments (e.g. ML1:reach-v3; `icl-metarl suites` lists them)"
    )


def _cache_dir() -> Path:
    root = os.environ.get("ICL_METARL_CACHE") or Path.home() / ".cache" / "icl_metarl"
    return Path(root) / "tasks"


@lru_cache(maxsize=16)
def _benchmark_tasks(suite_name: str, seed: int) -> dict[str, list[dict]]:
    """Both splits of a benchmark, as JSON task dicts, cached on disk (ML45 takes ~25 s to build)."""
    mw = versions()["metaworld"]
    cache = _cache_dir() / f"{suite_name.replace(':', '_')}-seed{seed}-mw{mw}.json"
    if cache.exists():
        try:
            return json.loads(cache.read_text())
        except json.JSONDecodeError:
            pass  # a damaged cache file is rebuilt below
    if suite_name.startswith("ML1:"):
        bench = metaworld.ML1(suite_name[4:], seed=seed)
    else:
        bench = {"ML10": metaworld.ML10, "ML45": metaworld.ML45}[suite_name](seed=seed)
    out = {}
    for split, tasks in (("train", bench.train_tasks), ("test", bench.test_tasks)):
        # The Task bytes were made by metaworld in this process, not read from a user's file.
        out[split] = [
            TaskSpec(t.env_name, tuple(float(x) for x in pickle.loads(t.data)["rand_vec"])).to_json()
            for t in tasks
        ]
    atomic_write_json(cache, out)
    return out


#: mixed into the benchmark seed for the validation draw; no training draw uses it
VALIDATION_SEED = 0x5A11D


@lru_cache(maxsize=16)
def _validation_tasks(suite_name: str, seed: int) -> tuple[TaskSpec, ...]:
    suite = get_suite(suite_name)
    full = get_suite(suite.benchmark)
    bench = full.tasks("train", seed) + full.tasks("test", seed)
    envs = suite.envs("validation")
    count = VALIDATION_TASKS_PER_ENV * len(envs) if suite.holds_out else len(full.tasks("train", seed))
    draw_seed = int(np.random.SeedSequence([seed, VALIDATION_SEED]).generate_state(1)[0])
    return tuple(sample_new_tasks(envs, count, draw_seed, exclude=bench))


def parse_task_pool(value) -> str | int:
    """'benchmark', 'fresh' or a positive count of distinct new tasks."""
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
        count = int(value)
        if count < 1:
            raise UsageError(f"task pool count must be >= 1, got {value!r}; valid: benchmark, fresh, N >= 1")
        return count
    if value in POOL_WORDS:
        return value
    raise UsageError(f"unknown task pool {value!r}; valid: benchmark, fresh, or a count N >= 1")


def sample_new_tasks(
    env_names_: Sequence[str], count: int, seed: int, exclude: Sequence[TaskSpec] = ()
) -> list[TaskSpec]:
    """Draw ``count`` new tasks with each environment's own sampler, round-robin over environments.

    Draws as Meta-World builds its benchmarks (an unfrozen, seeded environment reset, so each
    environment's own rejection rules apply, e.g. goals not too close to the object). Never returns
    a task equal to one in ``exclude`` (pass the test tasks) or a repeat.
    """
    if count < 1:
        raise UsageError(f"task count must be >= 1, got {count}")
    for name in env_names_:
        if name not in ALL_V3_ENVIRONMENTS:
            raise choice_error("Meta-World environment", name, env_names())
    banned = {(t.env_name, t.rand_vec) for t in exclude}
    samplers = {}
    out: list[TaskSpec] = []
    tries = 0
    while len(out) < count:
        i = len(out) % len(env_names_)
        name = env_names_[i]
        if name not in samplers:
            env = ALL_V3_ENVIRONMENTS[name]()
            env._set_task_called = True
            env._freeze_rand_vec = False
            env.seeded_rand_vec = True
            env.seed(int(np.random.default_rng([seed, i]).integers(2**31)))
            samplers[name] = env
        env = samplers[name]
        env.reset()
        vec = tuple(float(x) for x in np.asarray(env._last_rand_vec, dtype=np.float64))
        tries += 1
        if (name, vec) in banned:
            if tries > 100 * count:
                raise UsageError(f"cannot draw {count} distinct new tasks for {list(env_names_)}")
            continue
        banned.add((name, vec))
        out.append(TaskSpec(name, vec))
    for env in samplers.values():
        env.close()
    return out


# ----------------------------------------------------------------------------------- trial envs
def metaworld_task(task: TaskSpec) -> metaworld.Task:
    """Meta-World's own ``Task`` for ``task``, goal hidden as the ML benchmarks do: the one place it is built.

    Its ``data`` is a pickle made here, in this process, never read from a user's file.
    """
    if task.env_name not in ALL_V3_ENVIRONMENTS:
        raise choice_error("Meta-World environment", task.env_name, env_names())
    data = {"rand_vec": np.asarray(task.rand_vec, dtype=np.float64), "env_cls": ALL_V3_ENVIRONMENTS[task.env_name],
            "partially_observable": True}
    return metaworld.Task(env_name=task.env_name, data=pickle.dumps(data))


def make_metaworld_env(task: TaskSpec, seed: int = 0):
    """A raw Meta-World environment set to ``task`` with the goal hidden (as the ML benchmarks do)."""
    mw_task = metaworld_task(task)
    env = ALL_V3_ENVIRONMENTS[task.env_name]()
    env.set_task(mw_task)
    env.seed(seed)
    return env


class TrialEnv(gym.Env):
    """One task played for many episodes of a fixed length; goal hidden, true goal in ``info["goal"]``.

    Episodes never terminate early (Meta-World's never do); each is truncated at ``episode_length``
    simulator steps. With ``action_repeat`` k (the decision interval), one ``step`` holds its action for k
    simulator steps (fewer at the episode's end): the reward is their sum, ``info["success"]`` is 1 if
    Meta-World's per-step flag was 1 at any of them (the benchmark counts success at any simulator step),
    and ``info["success_substep"]`` is the 1-based simulator step of the decision where it first was
    (0: none). k = 1 is Meta-World's own step.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: TaskSpec, episode_length: int = DEFAULT_EPISODE_LENGTH, seed: int = 0,
                 action_repeat: int = 1):
        check_episode_length(episode_length)
        self.task = task
        self.episode_length = int(episode_length)
        self.action_repeat = check_action_repeat(action_repeat)
        self._env = make_metaworld_env(task, seed)
        self._env.max_path_length = self.episode_length
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
        self._t = 0

    def _info(self, info: dict, success: float, substep: int) -> dict:
        return {
            "success": success,
            "success_substep": substep,
            "goal": np.asarray(self._env._get_pos_goal(), dtype=np.float64).copy(),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self._env.reset()
        self._t = 0
        return obs, self._info(info, float(info.get("success", 0.0)), 0)

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        total, substep = 0.0, 0
        for i in range(min(self.action_repeat, self.episode_length - self._t)):
            obs, reward, _, _, info = self._env.step(action)
            total += float(reward)
            if substep == 0 and float(info.get("success", 0.0)) >= 1.0:
                substep = i + 1
            self._t += 1
        success = 1.0 if substep else float(info.get("success", 0.0))
        return obs, total, False, self._t >= self.episode_length, self._info(info, success, substep)

    def close(self):
        self._env.close()


def check_episode_length(episode_length) -> int:
    if not isinstance(episode_length, (int, np.integer)) or episode_length < 1:
        raise UsageError(f"episode length must be a positive integer, got {episode_length!r}")
    return int(episode_length)


def check_action_repeat(action_repeat) -> int:
    """The decision interval k: an agent acts every k-th simulator step, its action held in between."""
    if not isinstance(action_repeat, (int, np.integer)) or isinstance(action_repeat, bool) or action_repeat < 1:
        raise UsageError(f"action repeat (decision interval) must be an integer >= 1, got {action_repeat!r}")
    return int(action_repeat)


def decisions_per_episode(episode_length: int, action_repeat: int = 1) -> int:
    """How many times an agent acts in an episode of ``episode_length`` simulator steps: ceil(L / k)."""
    return -(-check_episode_length(episode_length) // check_action_repeat(action_repeat))


VECTOR_MODES = ("sync", "async")


def make_trial_envs(
    tasks: Sequence[TaskSpec],
    episode_length: int = DEFAULT_EPISODE_LENGTH,
    seed: int = 0,
    mode: str = "sync",
    action_repeat: int = 1,
) -> gym.vector.VectorEnv:
    """A gymnasium vector environment with one trial per task, stepped in lockstep.

    Autoreset is off: every trial's episode ends at the same step, and the caller resets all of
    them to start the next episode of the trials (the task stays, only ``make_trial_envs`` changes it).
    ``episode_length`` counts simulator steps; each step holds its action ``action_repeat`` of them.
    """
    check_episode_length(episode_length)
    check_action_repeat(action_repeat)
    if mode not in VECTOR_MODES:
        raise choice_error("vector mode", mode, VECTOR_MODES)
    if len(tasks) == 0:
        raise UsageError("no tasks to play")
    for t in tasks:
        if t.env_name not in env_names():
            raise choice_error("Meta-World environment", t.env_name, env_names())
    fns = [_env_fn(t, episode_length, seed + i, action_repeat) for i, t in enumerate(tasks)]
    if mode == "sync":
        return SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    return AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED, context="spawn")


def _env_fn(task: TaskSpec, episode_length: int, seed: int, action_repeat: int = 1):
    def make():
        return TrialEnv(task, episode_length, seed, action_repeat)

    return make


# ------------------------------------------------------------------------------------- experts
@lru_cache(maxsize=None)
def expert_policy(env_name: str):
    """Meta-World's scripted expert for an environment (reads the goal from ``obs[-3:]``)."""
    # The experts warn on every call that their gains exceed the action range; actions are clipped.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
    if env_name not in ENV_POLICY_MAP:
        raise choice_error("Meta-World environment", env_name, sorted(ENV_POLICY_MAP))
    return ENV_POLICY_MAP[env_name]()


#: Measured corrections a study configuration may name in ``expert_goal_offsets`` (none is applied unless
#: it does): where the expert is told the goal is, relative to the true goal (metres). Meta-World's reach
#: experts steer the *hand* (obs[:3]) to the goal, but success and reward are measured at the TCP between
#: the fingers, 4.49 cm below the hand: told the true goal, the expert parks the TCP 4.55 cm from it, inside
#: the 5 cm success radius by 4.5 mm (first success at step 50 on average), so a policy that imitates it has
#: a 4.5 mm error budget. Told the goal raised by the hand-TCP offset, it parks the TCP 0.6 cm from the goal
#: (first success at step 36); measured on 20 test tasks of ML1:reach-v3 (hand - TCP = (0.0004, -0.0020,
#: 0.0449) m, std <= 2 mm; `git show 0b0df5c:scripts/expert_tcp_offset.py | python - --tasks 20`).
MEASURED_GOAL_OFFSETS = {"reach-v3": "reach-v3=0,0,0.045", "reach-wall-v3": "reach-wall-v3=0,0,0.045"}

GoalOffsets = dict[str, tuple[float, float, float]]


def parse_goal_offsets(entries: Sequence[str], suite_name: str | None = None) -> GoalOffsets:
    """``ENV=x,y,z`` entries (metres) -> {env: offset}; with ``suite_name``, each ENV must be one of its
    environments. The one reader of a configuration's ``expert_goal_offsets``."""
    allowed = None
    if suite_name is not None:
        suite = get_suite(suite_name)
        allowed = sorted(set(suite.train_envs) | set(suite.test_envs) | set(suite.validation_envs))
    out: GoalOffsets = {}
    for entry in entries:
        env, _, xyz = str(entry).partition("=")
        try:
            offset = tuple(float(v) for v in xyz.split(","))
        except ValueError:
            offset = ()
        if len(offset) != 3 or not all(np.isfinite(offset)):
            raise UsageError(f"expert goal offset {entry!r} is not ENV=x,y,z (metres), e.g. {MEASURED_GOAL_OFFSETS['reach-v3']}")
        if env not in ALL_V3_ENVIRONMENTS:
            raise choice_error("environment in expert_goal_offsets", env, env_names())
        if allowed is not None and env not in allowed:
            raise UsageError(f"expert_goal_offsets names {env}, not an environment of suite {suite_name} "
                             f"(its environments: {', '.join(allowed)})")
        if env in out:
            raise UsageError(f"expert_goal_offsets names {env} twice")
        out[env] = offset
    return out


def expert_actions(env_names_: Sequence[str], obs: np.ndarray, goals: np.ndarray,
                   goal_offsets: GoalOffsets | None = None) -> np.ndarray:
    """The expert's action for each row of ``obs`` (goal hidden), told the true ``goals``: (B, 4).

    The goal it is told is shifted by ``goal_offsets`` (a configuration's ``expert_goal_offsets``, parsed)
    for the environments it names, e.g. those whose scripted policy aims a point other than the one
    success is measured at (``MEASURED_GOAL_OFFSETS``).
    """
    obs = np.array(obs, dtype=np.float64, copy=True)  # (B, 39)
    table = goal_offsets or {}
    offsets = np.array([table.get(n, (0.0, 0.0, 0.0)) for n in env_names_])  # (B, 3)
    obs[:, -3:] = np.asarray(goals) + offsets
    return np.stack(
        [np.clip(expert_policy(n).get_action(o), -1.0, 1.0) for n, o in zip(env_names_, obs)]
    ).astype(np.float32)
