"""Cross-episode histories: trials of a scripted expert whose noise is annealed across episodes, on disk.

Generation plays trials on a suite's train split (or a pool of fresh tasks of its train environments),
writes them as shards plus a ``manifest.json``, resumes a killed run, and loads/validates a directory.
Not for: sampling training windows (``windows.py``); the trials are played by the harness's rollout loop.

Storage: one directory per shard, one ``.npy`` per field. ``.npy`` is the plainest format numpy can
memory-map (``np.load(mmap_mode="r")``) with no extra dependency and no pickle; one file per field lets a
reader touch only the fields it needs. Every file is written to a temporary name and renamed, and a shard
counts only once the manifest (rewritten atomically by one process alone) lists it with its sha256
checksums, or, under ``accelerate launch``, the rank file of the process that played it does (merged into
the manifest at the end, or on resume if its checksums verify). Each shard is a pure function of the
settings and its index (its own seeds), so a rerun regenerates exactly the missing shards and the
directory ends byte-identical to an uninterrupted run, whatever the number of workers or processes, but
for each shard's measured ``cpu_seconds`` in the manifest.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from einops import rearrange
from tqdm import tqdm

from icl_metarl.harness.agent import Agent, Privileged
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import as_json, atomic_write_bytes, atomic_write_json, read_json, versions
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import (
    ACT_DIM,
    OBS_DIM,
    GoalOffsets,
    TaskSpec,
    decisions_per_episode,
    expert_actions,
    get_suite,
    parse_goal_offsets,
    parse_task_pool,
    sample_new_tasks,
)
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.config import NOISE_KINDS, NOISE_SCHEDULES, GenerateConfig, check_generate

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
RANKS_DIR = "ranks"  # under several processes: the shards each one finished, until merged
# Per-step fields (first axis = steps, trial-major: trial, episode, step) and per-trial fields.
STEP_FIELDS = ("obs", "actions", "expert_actions", "rewards", "successes", "episode", "step")
TRIAL_FIELDS = ("trial_task",)
FIELDS = STEP_FIELDS + TRIAL_FIELDS


# ------------------------------------------------------------------------------------------ noise
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


# ---------------------------------------------------------------------------------- settings, pool
def _derived_seed(seed: int, purpose: int, *more: int) -> int:
    """An independent integer seed for one use of the run's seed (task order, pool, a shard...)."""
    return int(np.random.SeedSequence([seed, purpose, *more]).generate_state(1)[0])


def build_task_pool(cfg: GenerateConfig) -> tuple[list, list[int]]:
    """The pool of tasks (list of TaskSpec) and the pool index each trial plays: (tasks, trial_tasks).

    New tasks come from each train environment's own sampler and never equal a test task of the same
    benchmark seed; the check below holds for the benchmark pool too.
    """
    suite = get_suite(cfg.suite)
    pool = parse_task_pool(cfg.task_pool)
    excluded = suite.training_exclusions(cfg.suite_seed)  # test and validation tasks
    if pool == "benchmark":
        tasks = suite.tasks(cfg.split, cfg.suite_seed)
    else:
        count = cfg.trials if pool == "fresh" else pool
        tasks = sample_new_tasks(suite.train_envs, count, _derived_seed(cfg.seed, 1), exclude=excluded)
    if cfg.split == "train":
        banned = {(t.env_name, t.rand_vec) for t in excluded}
        clash = [t for t in tasks if (t.env_name, t.rand_vec) in banned]
        if clash:
            raise UsageError(f"task pool {cfg.task_pool!r} of {cfg.suite} contains {len(clash)} test or validation "
                             f"task(s), e.g. {clash[0].env_name}; valid pools never do")
    # Every task is played floor or ceil(trials / len(tasks)) times, in a seeded order.
    order = _interleave_envs(np.random.default_rng(_derived_seed(cfg.seed, 2)).permutation(len(tasks)), tasks)
    trial_tasks = [int(order[i % len(tasks)]) for i in range(cfg.trials)]
    return tasks, trial_tasks


def _interleave_envs(order: np.ndarray, tasks: list) -> np.ndarray:
    """``order`` stably sorted by each task's rank among its environment's tasks in it: one task of every
    environment, then a second of every environment, ... so any number of trials is spread over the
    environments floor/ceil when they hold equally many tasks. One environment: ``order`` unchanged."""
    seen: dict[str, int] = {}
    rank = np.empty(len(order), np.int64)
    for j, i in enumerate(order):
        name = tasks[i].env_name
        rank[j], seen[name] = seen.get(name, 0), seen.get(name, 0) + 1
    return order[np.argsort(rank, kind="stable")]


def environment_counts(cfg: GenerateConfig, tasks: list, trial_tasks: list[int]) -> dict[str, dict[str, int]]:
    """Per environment: its distinct tasks in the pool, and the trials and steps played on it."""
    steps_per_trial = cfg.episodes_per_trial * cfg.episode_length  # simulator steps
    counts: dict[str, dict[str, int]] = {}
    for t in tasks:
        counts.setdefault(t.env_name, {"tasks": 0, "trials": 0, "steps": 0})["tasks"] += 1
    for i in trial_tasks:
        counts[tasks[i].env_name]["trials"] += 1
        counts[tasks[i].env_name]["steps"] += steps_per_trial
    return dict(sorted(counts.items()))


def _settings(cfg: GenerateConfig) -> dict:
    """What determines the data: the config without the worker count, with the pool normalised."""
    d = as_json(asdict(cfg))  # as the manifest reads it back
    d.pop("workers")
    if d["action_repeat"] == 1:  # the data of every directory written before the setting existed
        d.pop("action_repeat")
    d["task_pool"] = str(parse_task_pool(cfg.task_pool))
    if cfg.policy:  # the policy's weights, not only its path, determine the data
        d["policy_sha256"] = _sha256_file(Path(cfg.policy) / "model.safetensors")
    return d


def _shard_trials(cfg: GenerateConfig) -> list[range]:
    return [range(s, min(s + cfg.trials_per_shard, cfg.trials)) for s in range(0, cfg.trials, cfg.trials_per_shard)]


def _shard_name(index: int) -> str:
    return f"{index:05d}"


# ------------------------------------------------------------------------------------- one shard
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
                 goal_offsets: GoalOffsets | None = None):
        self.kind, self.schedule, self.noise_max, self.episodes = kind, schedule, noise_max, episodes
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
            return expert_actions(privileged.env_names, obs, privileged.goals + self._goal_offsets[k],
                                  self.goal_offsets)
        expert = self.label(privileged.env_names, obs, privileged.goals)  # (T, 4)
        return perturb(expert, self.kind, self._levels[:, k], self._rng)

    def label(self, env_names, obs: np.ndarray, goals: np.ndarray) -> np.ndarray:
        """The expert's action told the true goal (the histories' label): computed once per observation
        when this agent already computed it to perturb it (uniform and gaussian noise)."""
        if self._labelled[0] is not obs:
            self._labelled = (obs, expert_actions(env_names, obs, goals, self.goal_offsets))
        return self._labelled[1]

    def end_episode(self) -> None:
        self._episode += 1


class HandoverAgent(Agent):
    """``first`` plays the first ``handover`` episodes of every trial, ``then`` the rest (relabelling's
    hand-over: a policy builds the context, the noisy expert finishes the trial). Both hear every
    episode's end, so each knows the trial's episode index; only the one playing observes its steps."""

    name = "handover"
    privileged = True  # ``then`` is told the goals; ``first`` is only ever shown the observations

    def __init__(self, first: Agent, then: Agent, handover: int):
        self.first, self.then, self.handover = first, then, handover
        self._episode = 0

    def start_trials(self, num_trials: int, seed: int) -> None:
        self.first.start_trials(num_trials, seed)
        self.then.start_trials(num_trials, seed)
        self._episode = 0

    def _playing(self) -> Agent:
        return self.first if self._episode < self.handover else self.then

    def act(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the hand-over agent acts only through act_privileged (its expert needs the goal)")

    def act_privileged(self, obs: np.ndarray, privileged: Privileged) -> np.ndarray:
        agent = self._playing()
        return agent.act_privileged(obs, privileged) if agent.privileged else agent.act(obs)

    def observe(self, reward: np.ndarray, success: np.ndarray) -> None:
        self._playing().observe(reward, success)

    def end_episode(self) -> None:
        self.first.end_episode()
        self.then.end_episode()
        self._episode += 1


class ShardRecorder:
    """The rollout loop's ``on_step`` for one shard: every step's observation, action taken, expert label
    (``label(env_names, obs, goals)``, the expert told the true goal; NaN in ``context_only`` episodes),
    reward and success."""

    def __init__(self, names: list[str], episodes: int, length: int, label, context_only: int = 0):
        T, K, L = len(names), episodes, length
        self.names, self.label, self.context_only = names, label, context_only
        self.obs = np.empty((T, K, L, OBS_DIM), np.float32)
        self.taken = np.empty((T, K, L, ACT_DIM), np.float32)
        self.expert = np.empty((T, K, L, ACT_DIM), np.float32)
        self.reward = np.empty((T, K, L), np.float32)
        self.success = np.empty((T, K, L), np.uint8)

    def __call__(self, episode: int, t: int, obs: np.ndarray, info: dict, actions: np.ndarray,
                 reward: np.ndarray, success: np.ndarray) -> None:
        if episode < self.context_only:  # context only: no label, no loss
            label = np.full((len(self.names), ACT_DIM), np.nan, np.float32)
        else:
            label = self.label(self.names, obs, info["goal"])  # (T, 4)
        self.obs[:, episode, t], self.expert[:, episode, t], self.taken[:, episode, t] = obs, label, actions
        self.reward[:, episode, t] = reward
        self.success[:, episode, t] = success > 0

    def arrays(self) -> dict[str, np.ndarray]:
        """The shard's step fields: flat, trial-major (trial, episode, step)."""
        T, K, L = self.reward.shape
        episode = np.broadcast_to(np.arange(K, dtype=np.int16)[None, :, None], (T, K, L))
        step = np.broadcast_to(np.arange(L, dtype=np.int16)[None, None, :], (T, K, L))
        flat = lambda a: np.ascontiguousarray(rearrange(a, "t k l ... -> (t k l) ..."))  # noqa: E731
        return {
            "obs": flat(self.obs),  # (N, 39)
            "actions": flat(self.taken),  # (N, 4)
            "expert_actions": flat(self.expert),  # (N, 4)
            "rewards": flat(self.reward),  # (N,)
            "successes": flat(self.success),  # (N,)
            "episode": flat(episode),  # (N,)
            "step": flat(step),  # (N,)
        }


def play_shard(tasks: list, cfg: GenerateConfig, shard_seed: int) -> dict[str, np.ndarray]:
    """Play one trial per task through the rollout loop with the annealed-noise expert (or, relabelling,
    a policy with its own context, then possibly the noisy expert); the shard's step arrays.

    Obs keep the goal hidden; the expert is told the true goal from ``info["goal"]``.
    """
    T, K = len(tasks), cfg.episodes_per_trial
    # Each agent is started here with its own seed (the policy's in 31 bits), as shards always were.
    expert = NoisyExpertAgent(cfg.noise_kind, cfg.noise_schedule, cfg.noise_max, K,
                              parse_goal_offsets(cfg.expert_goal_offsets))
    expert.start_trials(T, shard_seed)
    agent, context_only = expert, 0
    if cfg.policy:
        policy = InContextAgent.from_pretrained(cfg.policy)
        if policy.action_repeat != cfg.action_repeat:
            raise UsageError(f"policy {cfg.policy} acts every {policy.action_repeat} simulator steps; these histories "
                             f"are played at action_repeat={cfg.action_repeat}")
        policy.start_trials(T, shard_seed % (2**31))
        agent = HandoverAgent(policy, expert, cfg.handover) if cfg.handover else policy
        context_only = cfg.handover
    decisions = decisions_per_episode(cfg.episode_length, cfg.action_repeat)
    record = ShardRecorder([t.env_name for t in tasks], K, decisions, expert.label, context_only)
    for _ in play_trials(agent, tasks, shard_seed % (2**31 - T), shard_seed, K, 0, cfg.episode_length,
                         on_step=record, start_trials=False, action_repeat=cfg.action_repeat):
        pass
    return record.arrays()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _generate_shard(job: dict) -> dict:
    """Worker entry (top level, so a spawn pool can call it): play, write each field, return its record."""
    cpu = time.process_time()  # this worker's CPU time for the shard: the data's cost in training budgets
    cfg = GenerateConfig(**job["config"])
    tasks = [TaskSpec.from_json(t) for t in job["tasks"]]
    arrays = play_shard(tasks, cfg, _derived_seed(cfg.seed, 3, job["index"]))
    arrays["trial_task"] = np.asarray(job["trial_tasks"], dtype=np.int32)  # (T,) index into manifest tasks
    shard_dir = Path(job["out"]) / SHARDS_DIR / _shard_name(job["index"])
    checksums = {}
    for field in FIELDS:
        data = _npy_bytes(arrays[field])
        atomic_write_bytes(shard_dir / f"{field}.npy", data)
        checksums[field] = hashlib.sha256(data).hexdigest()
    # Trials (of this shard) that succeeded at least once in each episode: the improvement, at a glance.
    succeeded = rearrange(arrays["successes"], "(t k l) -> t k l", t=len(tasks), k=cfg.episodes_per_trial).max(-1)
    return {"index": job["index"], "trials": len(tasks), "steps": int(arrays["obs"].shape[0]),
            "successful_trials_per_episode": [int(x) for x in succeeded.sum(0)], "sha256": checksums,
            "cpu_seconds": round(time.process_time() - cpu, 3)}


# ------------------------------------------------------------------------------------- generation
def _new_manifest(cfg: GenerateConfig, tasks: list, trial_tasks: list[int]) -> dict:
    pool = parse_task_pool(cfg.task_pool)
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "source": (f"trials of policy {cfg.policy} for {cfg.handover} episode(s), then the noisy expert, expert-labelled"
                   if cfg.handover else f"trials of policy {cfg.policy}, expert-labelled" if cfg.policy
                   else "annealed-noise expert"),
        "settings": _settings(cfg),
        "pool": {
            "kind": pool if isinstance(pool, str) else "count",
            "distinct_tasks": len(tasks),
            "disjoint_from_test_tasks": cfg.split == "train",
        },
        "environments": environment_counts(cfg, tasks, trial_tasks),
        "noise": {
            "kind": cfg.noise_kind,
            "schedule": cfg.noise_schedule,
            "levels": (f"uniform in [0, {cfg.noise_max}] per trial and episode" if cfg.noise_schedule == "random"
                       else [float(x) for x in noise_levels(cfg.noise_schedule, cfg.episodes_per_trial, cfg.noise_max)]),
        },
        "obs_dim": OBS_DIM,
        "act_dim": ACT_DIM,
        "num_shards": len(_shard_trials(cfg)),
        "fields": {"step": list(STEP_FIELDS), "trial": list(TRIAL_FIELDS)},
        "versions": versions(),
        "tasks": [t.to_json() for t in tasks],
        "shards": {},
    }


def _check_same_settings(path: Path, old: dict, new: dict) -> None:
    """Refuse to finish a directory made with other settings, naming the first one that differs."""
    if old.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path / MANIFEST} has schema version {old.get('schema_version')!r}, this toolkit "
                         f"writes {SCHEMA_VERSION}; use another --out")
    defaults = as_json(asdict(GenerateConfig()))  # a setting added later: its default
    for key, value in new["settings"].items():
        before = old["settings"].get(key, defaults.get(key))
        if before != value:
            raise UsageError(f"{path} was generated with {key}={before!r}, not {value!r}; "
                             f"rerun with the same settings or use another --out")
    for key in ("metaworld", "mujoco"):
        if old["versions"].get(key) != new["versions"].get(key):
            raise UsageError(f"{path} was generated with {key} {old['versions'].get(key)}, this is "
                             f"{new['versions'].get(key)}; use another --out")
    if old["tasks"] != new["tasks"]:
        raise UsageError(f"{path} holds a different task list for the same settings; use another --out")


def _remove_stale_temporaries(path: Path) -> None:
    """Half-written files of a killed run (``.name.tmp-PID``) are never data; clear them before resuming."""
    for tmp in path.rglob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _open_directory(out: Path, manifest: dict) -> dict:
    """The shard records an earlier run of the same settings left in ``out`` (none in a new directory);
    refuses a directory of other settings, or one that is not a histories directory."""
    if (out / MANIFEST).exists():
        old = _read_manifest(out)
        _check_same_settings(out, old, manifest)
        return old["shards"]
    if out.exists() and any(not p.name.startswith(".") and p.name not in (SHARDS_DIR, RANKS_DIR) for p in out.iterdir()):
        raise UsageError(f"{out} exists and is not a histories directory (no {MANIFEST}); use another --out")
    return {}


def _check_trial_order(out: Path, records: dict, spans: list[range], trial_tasks: list[int]) -> None:
    """Refuse to finish a directory whose shards play other tasks than this version assigns them (multi-
    environment directories from before trials were interleaved over environments)."""
    for name, record in records.items():
        expected = np.asarray([trial_tasks[t] for t in spans[int(name)]], dtype=np.int32)
        if record["sha256"]["trial_task"] != hashlib.sha256(_npy_bytes(expected)).hexdigest():
            raise UsageError(f"{out} shard {name} plays other tasks than this version assigns to its trials "
                             f"(an older trial order); use another --out")


def _rank_file(out: Path, rank: int) -> Path:
    return out / RANKS_DIR / f"rank-{rank:05d}.json"


def _rank_records(out: Path) -> dict:
    """The shard records that the processes of a multi-process run listed, each in its own rank file."""
    records = {}
    for file in sorted((out / RANKS_DIR).glob("rank-*.json")):
        records.update(read_json(file)["shards"])
    return records


def _shard_intact(out: Path, name: str, record: dict) -> bool:
    """Every file of the shard is there with the checksum its record lists."""
    files = [out / SHARDS_DIR / name / f"{field}.npy" for field in FIELDS]
    return all(f.is_file() and _sha256_file(f) == record["sha256"][f.stem] for f in files)


def _adopt_rank_records(out: Path, shards: dict) -> dict:
    """``shards`` plus the intact shards that a killed multi-process run listed only in its rank files."""
    shards = dict(shards)
    for name, record in _rank_records(out).items():
        if name in shards:
            continue
        if _shard_intact(out, name, record):
            shards[name] = record
        else:
            print(f"shard {name} listed in {out / RANKS_DIR} fails its checksums; generating it again", file=sys.stderr)
    return dict(sorted(shards.items()))


def generate(cfg: GenerateConfig, out: str | Path, progress: bool = True) -> dict:
    """Generate (or finish) the histories directory ``out``; returns the complete manifest.

    Under ``accelerate launch`` with N processes, process r plays the missing shards i with i % N == r
    and lists them in its own rank file; process 0 merges the lists into the manifest once every process
    has finished, so the directory is the one a single process writes.
    """
    check_generate(cfg)
    out = Path(out)
    # Processes finish their shares at different times: wait at the last barrier longer than torch's 30 min.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    world, rank = state.num_processes, state.process_index
    with state.main_process_first():  # process 0 builds (and caches) the task lists, the others then read them
        tasks, trial_tasks = build_task_pool(cfg)
    manifest = _new_manifest(cfg, tasks, trial_tasks)
    spans = _shard_trials(cfg)
    done = _open_directory(out, manifest)
    _check_trial_order(out, done, spans, trial_tasks)
    state.wait_for_everyone()  # every process has checked the directory before process 0 rewrites it
    if state.is_main_process:
        if out.exists():
            _remove_stale_temporaries(out)
        manifest["shards"] = _adopt_rank_records(out, done)
        atomic_write_json(out / MANIFEST, manifest)
        shutil.rmtree(out / RANKS_DIR, ignore_errors=True)  # what they listed is in the manifest now
    state.wait_for_everyone()
    manifest["shards"] = _read_manifest(out)["shards"]

    todo = [i for i in range(len(spans)) if _shard_name(i) not in manifest["shards"] and i % world == rank]
    jobs = [
        {
            "index": i,
            "out": str(out),
            "config": asdict(cfg),
            "tasks": [tasks[trial_tasks[t]].to_json() for t in spans[i]],
            "trial_tasks": [trial_tasks[t] for t in spans[i]],
        }
        for i in todo
    ]
    steps_per_trial = cfg.episodes_per_trial * decisions_per_episode(cfg.episode_length, cfg.action_repeat)
    done_steps = sum(r["steps"] for r in manifest["shards"].values())
    workers = min(cfg.workers or (default_workers() if world == 1 else 1), max(len(jobs), 1))
    bar = tqdm(
        total=done_steps + sum(len(spans[i]) for i in todo) * steps_per_trial,
        initial=done_steps,
        unit="step", unit_scale=True, disable=not progress or not state.is_main_process, mininterval=0, miniters=1,
        desc=f"generate {cfg.suite} ({workers} worker{'s' * (workers > 1)}"
             f"{f' in each of {world} processes' if world > 1 else ''})",
    )
    start = time.perf_counter()
    mine = {}  # under several processes: the shards this one played, listed in its rank file
    with _shard_runner(workers) as run:
        for record in run(_generate_shard, jobs):
            name = _shard_name(record["index"])
            if world == 1:
                manifest["shards"] = dict(sorted({**manifest["shards"], name: record}.items()))
                atomic_write_json(out / MANIFEST, manifest)  # the shard counts from here on
            else:
                mine[name] = record
                atomic_write_json(_rank_file(out, rank), {"shards": mine})  # ... or from here on
            bar.update(record["steps"])
    bar.close()
    state.wait_for_everyone()  # every process has listed its shards
    if state.is_main_process:
        manifest["shards"] = dict(sorted({**manifest["shards"], **_rank_records(out)}.items()))
        manifest["complete"] = len(manifest["shards"]) == len(spans)
        atomic_write_json(out / MANIFEST, manifest)
        shutil.rmtree(out / RANKS_DIR, ignore_errors=True)
    state.wait_for_everyone()
    manifest = _read_manifest(out)
    seconds = time.perf_counter() - start
    if progress and state.is_main_process:
        new_steps = sum(r["steps"] for r in manifest["shards"].values()) - done_steps
        rate = new_steps / seconds if seconds > 0 else float("nan")
        per_episode = np.sum([r["successful_trials_per_episode"] for r in manifest["shards"].values()], 0) / cfg.trials
        print(f"success rate per episode: {' '.join(f'{x:.2f}' for x in per_episode)}")
        print(f"generated {new_steps} steps in {seconds:.1f} s: {rate:,.0f} steps/s with {workers} worker(s)"
              f"{f' in each of {world} processes' if world > 1 else ''}; {out} holds {cfg.trials} trials, "
              f"{len(spans)} shards, complete")
    return manifest


class _shard_runner:
    """``run(fn, jobs)`` yielding results as they finish: in this process for 1 worker, else a spawn pool."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def __enter__(self):
        if self.workers <= 1:
            return lambda fn, jobs: map(fn, jobs)
        self.pool = mp.get_context("spawn").Pool(self.workers)
        return lambda fn, jobs: self.pool.imap_unordered(fn, jobs)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] is not None else self.pool.close()
            self.pool.join()
        return False


# ---------------------------------------------------------------------------------------- loading
def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise UsageError(f"missing {file}: not a histories directory, or its generation never started")
    manifest = read_json(file)
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        got = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise UsageError(f"{file} has schema version {got!r}; this toolkit reads {SCHEMA_VERSION}")
    return manifest


def _sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Histories:
    """A validated histories directory: its manifest and, per shard, its fields memory-mapped on access."""

    path: Path
    manifest: dict
    shards: list[Shard]

    @property
    def episode_length(self) -> int:
        """Simulator steps per episode."""
        return int(self.manifest["settings"]["episode_length"])

    @property
    def action_repeat(self) -> int:
        """The decision interval the trials were played at (1 for data written before the setting)."""
        return int(self.manifest["settings"].get("action_repeat", 1))

    @property
    def decisions(self) -> int:
        """Stored steps (decisions, tokens) per episode."""
        return decisions_per_episode(self.episode_length, self.action_repeat)

    @property
    def tasks(self) -> list:
            return [TaskSpec.from_json(t) for t in self.manifest["tasks"]]

    @property
    def num_steps(self) -> int:
        return sum(int(s["obs"].shape[0]) for s in self.shards)


def load_histories(path: str | Path, verify: bool = True) -> Histories:
    """Open a complete histories directory; with ``verify``, check every file's sha256 against the manifest.

    Any problem (missing or foreign manifest, incomplete run, missing, truncated or edited shard file)
    is a one-line UsageError naming the file.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    n = manifest.get("num_shards")
    if not manifest.get("complete") or len(manifest.get("shards", {})) != n:
        raise UsageError(f"{path / MANIFEST} lists {len(manifest.get('shards', {}))} of {n} shards: generation "
                         f"did not finish; rerun the same generate command to complete it")
    shards = []
    for name, record in manifest["shards"].items():
        for field in FIELDS:
            file = path / SHARDS_DIR / name / f"{field}.npy"
            if not file.is_file():
                raise UsageError(f"missing shard file {file}")
            if verify and _sha256_file(file) != record["sha256"][field]:
                raise UsageError(f"checksum mismatch in {file}: truncated or edited since generation")
            try:
                rows = _OPEN_MAPS.get(file).shape[0]
            except (ValueError, OSError) as e:
                raise UsageError(f"cannot read {file} as .npy: {e}") from None
            expected = record["trials"] if field in TRIAL_FIELDS else record["steps"]
            if rows != expected:
                raise UsageError(f"{file} holds {rows} rows, the manifest says {expected}")
        shards.append(Shard(path / SHARDS_DIR / name))
    return Histories(path, manifest, shards)


class _MapCache:
    """The memory maps open at once, over every shard of every histories directory: at most ``limit``.

    Each ``np.load(mmap_mode="r")`` holds one file descriptor (Python's mmap keeps a duplicate) for as long
    as the map lives, so mapping every field of every shard up front ran out of descriptors (8 per shard:
    the common limit of 1,024 at about 128 shards, where a full-size ML45 set has thousands). Maps are
    opened on access and the least recently used is dropped past the limit (half the open-file limit, see
    ``_map_limit``; a set larger than that reads random windows about 9x slower, scripts/bench_windows.py,
    so raise ``ulimit -n`` or add DataLoader workers there); an array a caller still holds
    keeps its own map alive. A file replaced since it was mapped (same path, other inode, size or time) is
    mapped again, never served stale.
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit  # None: ``_map_limit()``, decided at the first map, not when the module is imported
        self._maps: OrderedDict[str, tuple[tuple, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, file: Path) -> np.ndarray:
        key, st = str(file), os.stat(file)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if self.limit is None:
                self.limit = _map_limit()
            hit = self._maps.get(key)
            if hit is not None and hit[0] == stamp:
                self._maps.move_to_end(key)
                return hit[1]
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            self._maps[key] = (stamp, array)
            self._maps.move_to_end(key)
            while len(self._maps) > self.limit:
                self._maps.popitem(last=False)
            return array


def _map_limit() -> int:
    """How many memory maps may stay open: half the process's open-file limit, after raising its soft
    limit to the hard one (at most 65,536) where the system allows; 512 where it cannot be read."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        ceiling = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < ceiling:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        return max(64, min(soft, 65536) // 2)
    except (ImportError, ValueError, OSError):
        return 512


_OPEN_MAPS = _MapCache()


class Shard(Mapping):
    """One shard's fields by name (``shard["obs"]``), each a read-only memory map opened on access."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __getitem__(self, field: str) -> np.ndarray:
        if field not in FIELDS:
            raise KeyError(field)
        return _OPEN_MAPS.get(self.directory / f"{field}.npy")

    def __iter__(self) -> Iterator[str]:
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)
