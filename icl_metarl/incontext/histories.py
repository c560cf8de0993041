"""Generating a histories directory: trials of a scripted expert whose noise is annealed across episodes.

Generation plays trials on a suite's train split (or a pool of fresh tasks of its train environments),
writes them as shards plus a ``manifest.json``, and resumes a killed run. Not for: the shard format and
reading a directory (``shards.py``), sampling training windows (``windows.py``); the trials are played
by the harness's rollout loop (``recording.py``).

A shard counts only once the manifest (rewritten atomically by one process alone) lists it with its
sha256 checksums, or, under ``accelerate launch``, the rank file of the process that played it does
(merged into the manifest at the end, or on resume if its checksums verify). Each shard is a pure
function of the settings and its index (its own seeds), so a rerun regenerates exactly the missing
shards and the directory ends byte-identical to an uninterrupted run, whatever the number of workers or
processes, but for each shard's measured ``cpu_seconds`` in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
from einops import rearrange
from tqdm import tqdm

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import as_json, atomic_write_json, read_json, versions
from icl_metarl.harness.suites import ACT_DIM, OBS_DIM, TaskSpec, decisions_per_episode, parse_task_pool
from icl_metarl.incontext.config import GenerateConfig, check_generate
from icl_metarl.incontext.noise import noise_levels
from icl_metarl.incontext.recording import play_shard
from icl_metarl.incontext.shards import (
    FIELDS,
    MANIFEST,
    SCHEMA_VERSION,
    SHARDS_DIR,
    STEP_FIELDS,
    TRIAL_FIELDS,
    npy_bytes,
    read_manifest,
    sha256_file,
    write_shard,
)
from icl_metarl.incontext.task_pools import build_task_pool, derived_seed, environment_counts

RANKS_DIR = "ranks"  # under several processes: the shards each one finished, until merged


# -------------------------------------------------------------------------------------- settings
def _settings(cfg: GenerateConfig) -> dict:
    """What determines the data: the config without the worker count, with the pool normalised."""
    d = as_json(asdict(cfg))  # as the manifest reads it back
    d.pop("workers")
    if d["action_repeat"] == 1:  # the data of every directory written before the setting existed
        d.pop("action_repeat")
    if d["action_noise"] == 0.0:  # likewise for the DART noise
        d.pop("action_noise")
    if not d["self_imitation"]:  # and for self-imitation labels
        d.pop("self_imitation")
    d["task_pool"] = str(parse_task_pool(cfg.task_pool))
    if cfg.policy:  # the policy's weights, not only its path, determine the data
        d["policy_sha256"] = sha256_file(Path(cfg.policy) / "model.safetensors")
    return d


def _shard_trials(cfg: GenerateConfig) -> list[range]:
    return [range(s, min(s + cfg.trials_per_shard, cfg.trials)) for s in range(0, cfg.trials, cfg.trials_per_shard)]


def _shard_name(index: int) -> str:
    return f"{index:05d}"


# ------------------------------------------------------------------------------------- one shard
def _generate_shard(job: dict) -> dict:
    """Worker entry (top level, so a spawn pool can call it): play, write each field, return its record."""
    cpu = time.process_time()  # this worker's CPU time for the shard: the data's cost in training budgets
    cfg = GenerateConfig(**job["config"])
    tasks = [TaskSpec.from_json(t) for t in job["tasks"]]
    arrays = play_shard(tasks, cfg, derived_seed(cfg.seed, 3, job["index"]))
    arrays["trial_task"] = np.asarray(job["trial_tasks"], dtype=np.int32)  # (T,) index into manifest tasks
    checksums = write_shard(Path(job["out"]) / SHARDS_DIR / _shard_name(job["index"]), arrays)
    # Trials (of this shard) that succeeded at least once in each episode: the improvement, at a glance.
    succeeded = rearrange(arrays["successes"], "(t k l) -> t k l", t=len(tasks), k=cfg.episodes_per_trial).max(-1)
    return {"index": job["index"], "trials": len(tasks), "steps": int(arrays["obs"].shape[0]),
            "successful_trials_per_episode": [int(x) for x in succeeded.sum(0)], "sha256": checksums,
            "cpu_seconds": round(time.process_time() - cpu, 3)}


# ------------------------------------------------------------------------------------- generation
class _OneProcess:
    """accelerate's ``PartialState`` as a process started without a launcher sees it, without importing torch
    (the generating workers and a one-process run never need it)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def main_process_first(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


def _processes():
    """The processes of an ``accelerate launch`` that share the shards, or this one alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _OneProcess()
    import torch  # here, not at the top: a spawn worker imports this module for _generate_shard alone
    from accelerate import PartialState

    # Processes finish their shares at different times: wait at the last barrier longer than torch's 30 min.
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))


def _new_manifest(cfg: GenerateConfig, tasks: list, trial_tasks: list[int]) -> dict:
    pool = parse_task_pool(cfg.task_pool)
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "source": (f"trials of policy {cfg.policy} for {cfg.handover} episode(s), then the noisy expert, expert-labelled"
                   if cfg.handover else f"trials of policy {cfg.policy}, labelled with its own latest successful episode "
                   "after a success (self-imitation), by the expert elsewhere" if cfg.self_imitation
                   else f"trials of policy {cfg.policy}, expert-labelled" if cfg.policy
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
        old = read_manifest(out)
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
        if record["sha256"]["trial_task"] != hashlib.sha256(npy_bytes(expected)).hexdigest():
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
    return all(f.is_file() and sha256_file(f) == record["sha256"][f.stem] for f in files)


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
    state = _processes()
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
    manifest["shards"] = read_manifest(out)["shards"]

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
    manifest = read_manifest(out)
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
