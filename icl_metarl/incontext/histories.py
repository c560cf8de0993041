"""Cross-episode histories: trials of a scripted expert whose noise is annealed across episodes, on disk.

Generation plays trials on a suite's train split (or a pool of fresh tasks of its train environments),
writes them as shards plus a ``manifest.json``, resumes a killed run, and loads/validates a directory.
Not for: sampling training windows (``windows.py``) or playing a learned policy.

Storage: one directory per shard, one ``.npy`` per field. ``.npy`` is the plainest format numpy can
memory-map (``np.load(mmap_mode="r")``) with no extra dependency and no pickle; one file per field lets a
reader touch only the fields it needs. Every file is written to a temporary name and renamed, and a shard
counts only once the manifest (rewritten atomically by the parent process alone) lists it with its
sha256 checksums. Each shard is a pure function of the settings and its index (its own seeds), so a rerun
regenerates exactly the missing shards and the directory ends byte-identical to an uninterrupted run,
whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from einops import rearrange

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import atomic_write_bytes, atomic_write_json, read_json, versions

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
NOISE_KINDS = ("uniform", "gaussian", "goal")
NOISE_SCHEDULES = ("linear", "cosine", "none", "random")
POOL_WORDS = ("benchmark", "fresh")
# Per-step fields (first axis = steps, trial-major: trial, episode, step) and per-trial fields.
STEP_FIELDS = ("obs", "actions", "expert_actions", "rewards", "successes", "episode", "step")
TRIAL_FIELDS = ("trial_task",)
FIELDS = STEP_FIELDS + TRIAL_FIELDS


@dataclass
class GenerateConfig:
    """Settings of one histories directory (everything but ``workers`` determines the data)."""

    suite: str = "ML1:reach-v3"
    """Suite name: ML1:<env>-v3, ML10 or ML45."""
    split: str = "train"
    """Benchmark split to play; 'test' only with the benchmark pool, for held-out evaluation histories."""
    task_pool: str = "benchmark"
    """'benchmark' (the split's tasks), N (N distinct new train tasks) or 'fresh' (a new task per trial)."""
    trials: int = 50
    """Number of trials to play."""
    episodes_per_trial: int = 10
    """Episodes per trial (the task stays fixed across them); at least 2, so a trial can improve."""
    episode_length: int = 500
    """Steps per episode (Meta-World's own limit is 500)."""
    noise_kind: str = "uniform"
    """'uniform': the expert's action is replaced by a uniform random one with probability level;
    'gaussian': Gaussian noise of standard deviation level is added, then clipped to [-1, 1];
    'goal': the learner heads for a wrong goal, the true one moved by Gaussian noise of standard
    deviation level (metres, e.g. 0.15) drawn once per episode, so episodes explore whole places."""
    noise_schedule: str = "linear"
    """How the level falls across the episodes of a trial: linear or cosine from noise_max to 0, none, or
    random: drawn uniformly from [0, noise_max] for every episode of every trial, independent of the
    episode index, so a late episode's end point does not give the goal away (only its rewards do)."""
    noise_max: float = 1.0
    """Noise level of the first episode (probability for uniform, standard deviation for gaussian)."""
    trials_per_shard: int = 10
    """Trials per shard: the unit of parallel work, of resuming and of checksumming."""
    seed: int = 0
    """Seed of the noise, the task order and the task pool."""
    suite_seed: int = 0
    """Meta-World benchmark seed: which train/test tasks the suite has (use the evaluator's)."""
    workers: int = 0
    """Worker processes; 0 = one per core. Does not change the data."""
    policy: str = ""
    """On-policy relabelling: an in-context checkpoint that plays the trials with its own context
    (noise settings unused); every step is still labelled with the expert's action. Empty: the expert."""
    handover: int = 0
    """With a policy: it plays only the first this many episodes of each trial, which are then context
    only (their labels are NaN: no loss), and the noisy expert (noise settings) plays and labels the
    rest. 0: the policy plays every episode and every step is labelled (DAgger)."""


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


def check_config(cfg: GenerateConfig) -> GenerateConfig:
    """Reject settings that cannot be met, each with a one-line message naming the value."""
    from icl_metarl.harness.suites import check_episode_length, check_split, get_suite

    get_suite(cfg.suite)
    check_split(cfg.split)
    check_episode_length(cfg.episode_length)
    for name in ("trials", "trials_per_shard"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(cfg.episodes_per_trial, (int, np.integer)) or cfg.episodes_per_trial < 2:
        raise UsageError(f"episodes_per_trial must be an integer >= 2 (a trial must be able to improve), "
                         f"got {cfg.episodes_per_trial!r}")
    if cfg.noise_kind not in NOISE_KINDS:
        raise choice_error("noise kind", cfg.noise_kind, NOISE_KINDS)
    if cfg.noise_schedule not in NOISE_SCHEDULES:
        raise choice_error("noise schedule", cfg.noise_schedule, NOISE_SCHEDULES)
    if not 0.0 <= cfg.noise_max or (cfg.noise_kind == "uniform" and cfg.noise_max > 1.0):
        raise UsageError(f"noise_max must be in [0, 1] for uniform noise and >= 0 for gaussian or goal, got {cfg.noise_max!r}")
    if not isinstance(cfg.workers, (int, np.integer)) or cfg.workers < 0:
        raise UsageError(f"workers must be >= 0 (0 = one per core), got {cfg.workers!r}")
    if not isinstance(cfg.handover, (int, np.integer)) or not 0 <= cfg.handover < cfg.episodes_per_trial:
        raise UsageError(f"handover must be an integer in [0, episodes_per_trial={cfg.episodes_per_trial}), "
                         f"got {cfg.handover!r}")
    if cfg.handover and not cfg.policy:
        raise UsageError(f"handover={cfg.handover} needs a policy that plays the episodes before it")
    if cfg.policy and not (Path(cfg.policy) / "model.safetensors").is_file():
        raise UsageError(f"policy {cfg.policy!r} is not an in-context checkpoint directory (no model.safetensors)")
    pool = parse_task_pool(cfg.task_pool)
    if cfg.split == "test" and pool != "benchmark":
        raise UsageError(f"task pool {cfg.task_pool!r} draws new train tasks; with split 'test' only 'benchmark' is valid")
    if isinstance(pool, int) and pool > cfg.trials:
        raise UsageError(f"task pool {pool} needs at least {pool} trials to play each task once, got trials={cfg.trials}")
    return cfg


def build_task_pool(cfg: GenerateConfig) -> tuple[list, list[int]]:
    """The pool of tasks (list of TaskSpec) and the pool index each trial plays: (tasks, trial_tasks).

    New tasks come from each train environment's own sampler and never equal a test task of the same
    benchmark seed; the check below holds for the benchmark pool too.
    """
    from icl_metarl.harness.suites import get_suite, sample_new_tasks

    suite = get_suite(cfg.suite)
    pool = parse_task_pool(cfg.task_pool)
    test_tasks = suite.tasks("test", cfg.suite_seed)
    if pool == "benchmark":
        tasks = suite.tasks(cfg.split, cfg.suite_seed)
    else:
        count = cfg.trials if pool == "fresh" else pool
        tasks = sample_new_tasks(suite.train_envs, count, _derived_seed(cfg.seed, 1), exclude=test_tasks)
    if cfg.split == "train":
        banned = {(t.env_name, t.rand_vec) for t in test_tasks}
        clash = [t for t in tasks if (t.env_name, t.rand_vec) in banned]
        if clash:
            raise UsageError(f"task pool {cfg.task_pool!r} of {cfg.suite} contains {len(clash)} test task(s), "
                             f"e.g. {clash[0].env_name}; valid pools never do")
    # Every task is played floor or ceil(trials / len(tasks)) times, in a seeded order.
    order = np.random.default_rng(_derived_seed(cfg.seed, 2)).permutation(len(tasks))
    trial_tasks = [int(order[i % len(tasks)]) for i in range(cfg.trials)]
    return tasks, trial_tasks


def _settings(cfg: GenerateConfig) -> dict:
    """What determines the data: the config without the worker count, with the pool normalised."""
    d = asdict(cfg)
    d.pop("workers")
    d["task_pool"] = str(parse_task_pool(cfg.task_pool))
    if cfg.policy:  # the policy's weights, not only its path, determine the data
        d["policy_sha256"] = _sha256_file(Path(cfg.policy) / "model.safetensors")
    return d


def _shard_trials(cfg: GenerateConfig) -> list[range]:
    return [range(s, min(s + cfg.trials_per_shard, cfg.trials)) for s in range(0, cfg.trials, cfg.trials_per_shard)]


def _shard_name(index: int) -> str:
    return f"{index:05d}"


# ------------------------------------------------------------------------------------- one shard
def play_trials(tasks: list, cfg: GenerateConfig, shard_seed: int) -> dict[str, np.ndarray]:
    """Play one trial per task in lockstep with the annealed-noise expert; the shard's arrays.

    Step fields are flat, trial-major (trial, episode, step); obs keep the goal hidden, the expert is
    told the true goal from ``info["goal"]``.
    """
    from icl_metarl.harness.suites import ACT_DIM, OBS_DIM, expert_actions, make_trial_envs

    T, K, L = len(tasks), cfg.episodes_per_trial, cfg.episode_length
    names = [t.env_name for t in tasks]
    rng = np.random.default_rng(shard_seed)
    levels = trial_noise_levels(cfg.noise_schedule, T, K, cfg.noise_max, rng)  # (T, K)
    obs_buf = np.empty((T, K, L, OBS_DIM), np.float32)
    taken_buf = np.empty((T, K, L, ACT_DIM), np.float32)
    expert_buf = np.empty((T, K, L, ACT_DIM), np.float32)
    reward_buf = np.empty((T, K, L), np.float32)
    success_buf = np.empty((T, K, L), np.uint8)
    envs = make_trial_envs(tasks, L, seed=shard_seed % (2**31 - T))
    # The learner whose trials are recorded: the annealed-noise expert, or (relabelling) a policy
    # playing with its own context, its actions taken and the expert's recorded as the label.
    policy = _load_policy(cfg.policy, T, shard_seed) if cfg.policy else None
    if cfg.noise_kind == "goal":  # drawn only for this kind, so the other kinds' random streams stay as they were
        goal_offsets = levels.T[:, :, None] * rng.standard_normal((K, T, 3))  # (K, T, 3)
    try:
        for k in range(K):
            obs, info = envs.reset()  # autoreset is off: every trial starts episode k together
            learner = policy is not None and (cfg.handover == 0 or k < cfg.handover)
            for j in range(L):
                expert = expert_actions(names, obs, info["goal"])  # (T, 4)
                if learner:
                    taken = policy.act(obs)
                elif cfg.noise_kind == "goal":
                    taken = expert_actions(names, obs, info["goal"] + goal_offsets[k])
                else:
                    taken = perturb(expert, cfg.noise_kind, levels[:, k], rng)
                if learner and cfg.handover:
                    expert = np.full_like(expert, np.nan)  # context only: no label, no loss
                obs_buf[:, k, j], expert_buf[:, k, j], taken_buf[:, k, j] = obs, expert, taken
                obs, reward, _, _, info = envs.step(taken)
                reward_buf[:, k, j] = reward
                success_buf[:, k, j] = np.asarray(info["success"]) > 0
                if learner:
                    policy.observe(reward_buf[:, k, j], success_buf[:, k, j])
            if learner:
                policy.end_episode()
    finally:
        envs.close()
    episode = np.broadcast_to(np.arange(K, dtype=np.int16)[None, :, None], (T, K, L))
    step = np.broadcast_to(np.arange(L, dtype=np.int16)[None, None, :], (T, K, L))
    flat = lambda a: np.ascontiguousarray(rearrange(a, "t k l ... -> (t k l) ..."))  # noqa: E731
    return {
        "obs": flat(obs_buf),  # (N, 39)
        "actions": flat(taken_buf),  # (N, 4)
        "expert_actions": flat(expert_buf),  # (N, 4)
        "rewards": flat(reward_buf),  # (N,)
        "successes": flat(success_buf),  # (N,)
        "episode": flat(episode),  # (N,)
        "step": flat(step),  # (N,)
    }


def _load_policy(path: str, trials: int, seed: int):
    """The in-context agent of checkpoint ``path``, started on ``trials`` new trials."""
    from icl_metarl.incontext.agent import InContextAgent

    agent = InContextAgent.from_pretrained(path)
    agent.start_trials(trials, seed % (2**31))
    return agent


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _generate_shard(job: dict) -> dict:
    """Worker entry (top level, so a spawn pool can call it): play, write each field, return its record."""
    from icl_metarl.harness.suites import TaskSpec

    cfg = GenerateConfig(**job["config"])
    tasks = [TaskSpec.from_json(t) for t in job["tasks"]]
    arrays = play_trials(tasks, cfg, _derived_seed(cfg.seed, 3, job["index"]))
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
            "successful_trials_per_episode": [int(x) for x in succeeded.sum(0)], "sha256": checksums}


# ------------------------------------------------------------------------------------- generation
def _new_manifest(cfg: GenerateConfig, tasks: list) -> dict:
    from icl_metarl.harness.suites import ACT_DIM, OBS_DIM

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
    defaults = {f.name: f.default for f in fields(GenerateConfig)}  # a setting added later: its default
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


def generate(cfg: GenerateConfig, out: str | Path, progress: bool = True) -> dict:
    """Generate (or finish) the histories directory ``out``; returns the complete manifest."""
    from tqdm import tqdm

    check_config(cfg)
    out = Path(out)
    tasks, trial_tasks = build_task_pool(cfg)
    manifest = _new_manifest(cfg, tasks)
    if (out / MANIFEST).exists():
        old = _read_manifest(out)
        _check_same_settings(out, old, manifest)
        manifest["shards"] = old["shards"]
    elif out.exists() and any(not p.name.startswith(".") and p.name != SHARDS_DIR for p in out.iterdir()):
        raise UsageError(f"{out} exists and is not a histories directory (no {MANIFEST}); use another --out")
    if out.exists():
        _remove_stale_temporaries(out)
    atomic_write_json(out / MANIFEST, manifest)

    spans = _shard_trials(cfg)
    todo = [i for i in range(len(spans)) if _shard_name(i) not in manifest["shards"]]
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
    steps_per_trial = cfg.episodes_per_trial * cfg.episode_length
    workers = min(cfg.workers or default_workers(), max(len(jobs), 1))
    bar = tqdm(
        total=cfg.trials * steps_per_trial,
        initial=sum(r["steps"] for r in manifest["shards"].values()),
        unit="step", unit_scale=True, disable=not progress, mininterval=0, miniters=1,
        desc=f"generate {cfg.suite} ({workers} worker{'s' * (workers > 1)})",
    )
    start, new_steps = time.perf_counter(), 0
    with _shard_runner(workers) as run:
        for record in run(_generate_shard, jobs):
            manifest["shards"][_shard_name(record["index"])] = record
            manifest["shards"] = dict(sorted(manifest["shards"].items()))
            atomic_write_json(out / MANIFEST, manifest)  # the shard counts from here on
            new_steps += record["steps"]
            bar.update(record["steps"])
    bar.close()
    manifest["complete"] = len(manifest["shards"]) == len(spans)
    atomic_write_json(out / MANIFEST, manifest)
    seconds = time.perf_counter() - start
    if progress:
        rate = new_steps / seconds if seconds > 0 else float("nan")
        per_episode = np.sum([r["successful_trials_per_episode"] for r in manifest["shards"].values()], 0) / cfg.trials
        print(f"success rate per episode: {' '.join(f'{x:.2f}' for x in per_episode)}")
        print(f"generated {new_steps} steps in {seconds:.1f} s: {rate:,.0f} steps/s with {workers} worker(s); "
              f"{out} holds {cfg.trials} trials, {len(spans)} shards, complete")
    return manifest


class _shard_runner:
    """``run(fn, jobs)`` yielding results as they finish: in this process for 1 worker, else a spawn pool."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def __enter__(self):
        if self.workers <= 1:
            return lambda fn, jobs: map(fn, jobs)
        import multiprocessing as mp

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
    """A validated histories directory: its manifest and, per shard, its fields memory-mapped."""

    path: Path
    manifest: dict
    shards: list[dict[str, np.ndarray]]

    @property
    def episode_length(self) -> int:
        return int(self.manifest["settings"]["episode_length"])

    @property
    def tasks(self) -> list:
        from icl_metarl.harness.suites import TaskSpec

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
        arrays = {}
        for field in FIELDS:
            file = path / SHARDS_DIR / name / f"{field}.npy"
            if not file.is_file():
                raise UsageError(f"missing shard file {file}")
            if verify and _sha256_file(file) != record["sha256"][field]:
                raise UsageError(f"checksum mismatch in {file}: truncated or edited since generation")
            try:
                arrays[field] = np.load(file, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise UsageError(f"cannot read {file} as .npy: {e}") from None
            expected = record["trials"] if field in TRIAL_FIELDS else record["steps"]
            if arrays[field].shape[0] != expected:
                raise UsageError(f"{file} holds {arrays[field].shape[0]} rows, the manifest says {expected}")
        shards.append(arrays)
    return Histories(path, manifest, shards)
