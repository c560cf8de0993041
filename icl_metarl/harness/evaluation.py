"""The shared evaluator: every agent plays the same test tasks, in the same order, with the same seeds,
K adaptation then E evaluation episodes per trial, and every episode's outcome goes to results.json; a
killed evaluation rerun into the same directory plays only what it had not finished.

Not for: tables and plots (``report.py``), Meta-World's own evaluation function (``mw_adapter.py``).
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from icl_metarl.harness.agent import Agent, ReplayBest
from icl_metarl.harness.baselines import BASELINES
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import atomic_write_json, read_json, versions
from icl_metarl.harness.pipeline import split_in_two
from icl_metarl.harness.registry import load_agent
from icl_metarl.harness.rollout import VECTOR_MODES, play_trials
from icl_metarl.harness.settings import FLAGS
from icl_metarl.harness.suites import (
    DEFAULT_EPISODE_LENGTH,
    TaskSpec,
    check_action_repeat,
    check_episode_length,
    check_playable,
    get_suite,
)

RESULTS_FORMAT = "icl_metarl.evaluation/1"  # names the file format, not the module: kept across moves
RANK_FORMAT = "icl_metarl.evaluation.rank/2"  # the batches one of several processes played (/2: with the
# settings, tasks, agents and versions that say which evaluation they belong to)
#: keys of results.json that hold wall-clock figures: the only ones allowed to differ between two runs
TIMING_KEYS = ("timing",)
#: settings that change nothing played: a rerun that resumes an evaluation may give them otherwise
RESUME_FREE_SETTINGS = ("progress",)
#: what must be equal for a rerun to reuse the batches a file in --out holds (besides RESUME_FREE_SETTINGS)
IDENTITY_KEYS = ("settings", "tasks", "agents", "versions")


@dataclass
class EvalConfig:
    """What an evaluation plays; the same for every agent in it."""

    suite: str = "ML1:reach-v3"
    """Meta-World suite: ML1:<env>-v3, ML10 or ML45."""
    split: str = "test"
    """Which split's tasks to play: test (the figure to report, once per final recipe), validation (new
    tasks of the train environments, or with ML10-holdout / ML45-holdout of the held-out environments:
    choose recipes and checkpoints here) or train (a diagnostic only: the agents may have seen them)."""
    adaptation_episodes: int = field(default=10, metadata={FLAGS: ("-K",)})
    """K: episodes per trial in which the agent may adapt (Meta-World's benchmark uses 10)."""
    evaluation_episodes: int = field(default=3, metadata={FLAGS: ("-E",)})
    """E: episodes after the adaptation ones, whose success is the benchmark's figure (3)."""
    episode_length: int = DEFAULT_EPISODE_LENGTH
    """Simulator steps per episode (Meta-World's 500); episodes never end early."""
    action_repeat: int | None = None
    """Decision interval k: agents act every k-th simulator step, the action held in between (success
    still counts at any simulator step). None: each checkpoint acts at the interval it was trained with,
    the baselines at 1. Given, a checkpoint trained at another interval is refused."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Evaluation seeds: each seeds the environments and the agent's random numbers."""
    num_tasks: int | None = field(default=None, metadata={FLAGS: ("--tasks",)})
    """Play only the first N tasks of the split (None: all of them)."""
    tasks_per_env: int | None = None
    """Play only the first N tasks of each environment of the split, in the split's order (None: all of
    them); the benchmark's subset for multi-environment suites, the same for every agent."""
    task_seed: int = 0
    """Benchmark seed that fixes the task list (0: the tasks the agents' training split came from)."""
    batch_size: int = 50
    """Trials played in parallel in one vector environment."""
    vector: str = "sync"
    """sync (one process), async (one process per trial) or pipelined (two groups of trials, each in a
    worker process, stepped while the agent computes the other group's actions; same records as sync
    with half the batch size)."""
    progress: bool = True
    """Show a tqdm progress bar over environment steps."""

    def check(self) -> "EvalConfig":
        """Raise UsageError naming the first bad setting; return self."""
        check_playable(self.suite, self.split)
        check_episode_length(self.episode_length)
        if self.action_repeat is not None:
            check_action_repeat(self.action_repeat)
        for what, k in (("adaptation episodes (-K)", self.adaptation_episodes),
                        ("evaluation episodes (-E)", self.evaluation_episodes)):
            if not isinstance(k, (int, np.integer)) or k < 0:
                raise UsageError(f"{what} must be an integer >= 0, got {k!r}")
        if self.adaptation_episodes + self.evaluation_episodes < 1:
            raise UsageError("-K plus -E must be at least 1 episode, got 0")
        if len(self.seeds) == 0:
            raise UsageError("--seeds needs at least one seed")
        if any(not isinstance(s, (int, np.integer)) or s < 0 for s in self.seeds):
            raise UsageError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds must be distinct, got {list(self.seeds)}")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise UsageError(f"--tasks must be >= 1, got {self.num_tasks}")
        if self.tasks_per_env is not None and self.tasks_per_env < 1:
            raise UsageError(f"--tasks-per-env must be >= 1, got {self.tasks_per_env}")
        if self.tasks_per_env is not None and self.num_tasks is not None:
            raise UsageError("give --tasks or --tasks-per-env, not both")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.vector not in VECTOR_MODES:
            raise choice_error("vector mode", self.vector, VECTOR_MODES)
        return self

    def tasks(self) -> list[TaskSpec]:
        """The tasks every agent plays, in the order it plays them."""
        tasks = get_suite(self.suite).tasks(self.split, self.task_seed)
        if self.num_tasks is not None:
            if self.num_tasks > len(tasks):
                raise UsageError(f"--tasks {self.num_tasks} exceeds the {len(tasks)} {self.split} tasks of {self.suite}")
            tasks = tasks[: self.num_tasks]
        if self.tasks_per_env is not None:
            tasks = first_per_env(tasks, self.tasks_per_env, f"{self.split} split of {self.suite}")
        return tasks


def first_per_env(tasks: Sequence[TaskSpec], n: int, what: str = "tasks") -> list[TaskSpec]:
    """The first ``n`` tasks of each environment, in the order of ``tasks``; every environment must have n."""
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t.env_name] = counts.get(t.env_name, 0) + 1
    short = {e: c for e, c in counts.items() if c < n}
    if short:
        raise UsageError(f"--tasks-per-env {n} exceeds the tasks of {sorted(short)} in the {what} "
                         f"(fewest: {min(short.values())})")
    taken: dict[str, int] = {}
    out = []
    for t in tasks:
        if taken.get(t.env_name, 0) < n:
            taken[t.env_name] = taken.get(t.env_name, 0) + 1
            out.append(t)
    return out


@dataclass
class EvalAgent:
    """An agent as the evaluator lists it: a unique label, the agent, and where it came from."""

    label: str
    agent: Agent
    spec: str = ""
    adaptive: bool = True


def trial_seed(seed: int, task_index: int) -> int:
    """The environment seed of one trial: the same for every agent (the fair-play guarantee)."""
    return int(seed) * 1_000_003 + int(task_index)


class Processes(Protocol):
    """The processes of one launch as ``evaluate`` sees them; ``accelerate.PartialState`` is one."""

    process_index: int
    num_processes: int

    def wait_for_everyone(self) -> None: ...


# ------------------------------------------------------------------------------------- loading
def load_agents(specs: Sequence[str], non_adaptive: bool = False, options: dict | None = None,
                replay_best_after: int = 0) -> list[EvalAgent]:
    """Agents for the command line, with unique labels; ``non_adaptive`` adds each checkpoint's variant,
    ``replay_best_after`` K >= 1 each agent's ``ReplayBest`` variant (it replays its best of the first K
    episodes). ``options``: acting options by name (each learner takes its own, ``registry.load_agent``)."""
    if len(specs) == 0:
        raise UsageError("no agents to evaluate; give baseline names (random, oracle) or checkpoint directories")
    out: list[EvalAgent] = []
    for spec in specs:
        variants = [True] if spec in BASELINES or not non_adaptive else [True, False]
        for adaptive in variants:
            agent = load_agent(spec, adaptive=adaptive, options=options)
            base = spec if spec in BASELINES else (getattr(agent, "name", "") or Path(spec).name)
            if base in ("agent", ""):
                base = Path(spec).name
            out.append(EvalAgent(base if adaptive else f"{base} [non-adaptive]", agent, spec, adaptive))
            if replay_best_after and adaptive:
                replaying = ReplayBest(load_agent(spec, adaptive=True, options=options), replay_best_after)
                out.append(EvalAgent(f"{base} [replay-best]", replaying, spec, True))
    seen: dict[str, int] = {}
    for a in out:  # two checkpoints with the same name still get distinct rows
        seen[a.label] = seen.get(a.label, 0) + 1
        if seen[a.label] > 1:
            a.label = f"{a.label} #{seen[a.label]}"
    return out


def agent_action_repeat(agent: Agent, asked: int | None) -> int:
    """The decision interval ``agent`` plays at: its own (a checkpoint's ``action_repeat``) or, for agents
    that act at any interval (baselines: None), the one ``asked`` (default 1). A checkpoint asked to act
    at another interval than it was trained with is a one-line error."""
    own = getattr(agent, "action_repeat", None)
    if own is None:
        return 1 if asked is None else check_action_repeat(asked)
    if asked is not None and asked != own:
        raise UsageError(f"--action-repeat {asked}: {getattr(agent, 'checkpoint', None) or getattr(agent, 'source', None) or agent.name} was trained "
                         f"to act every {own} simulator steps; evaluate it with --action-repeat {own} or without the flag")
    return int(own)


def _new_results(config: EvalConfig, tasks: Sequence[TaskSpec], agents: Sequence[EvalAgent]) -> dict:
    return {
        "format": RESULTS_FORMAT,
        "settings": _settings(config),
        "diagnostic": config.split != "test",  # train-split figures say nothing about adaptation to new tasks
        "tasks": [{"index": j, **t.to_json()} for j, t in enumerate(tasks)],
        "seeds": list(config.seeds),
        "versions": versions(),
        "agents": {
            a.label: {"spec": a.spec, "adaptive": a.adaptive, "status": "pending", "description": _describe(a.agent),
                      "action_repeat": agent_action_repeat(a.agent, config.action_repeat)}
            for a in agents
        },
        "trials": [],
        "failures": [],
        "records": [],
        "timing": {},
    }


def _describe(agent: Agent) -> dict:
    try:
        d = agent.describe()
        json.dumps(d)
        return d
    except Exception as e:  # a description is not worth losing an evaluation over; say what happened
        return {"name": getattr(agent, "name", "?"), "describe_error": f"{type(e).__name__}: {e}"}


def evaluate(agents: Sequence[EvalAgent], config: EvalConfig, out_dir: str | Path | None = None,
             processes: Processes | None = None) -> dict | None:
    """Play every agent on the same trials; return the results dict, written to ``out_dir/results.json``
    after every batch of trials, so an agent that raises loses none of what was computed before.

    A rerun of the same evaluation into the same ``out_dir`` (after a kill) reuses every batch finished
    there (``played_batches``) and plays only the rest: its results equal an uninterrupted run's, timing
    aside, since each batch starts its agent anew with a seed of its own (``start_trials``). A batch that
    failed is played again. An ``out_dir`` that holds another evaluation (settings, tasks, agents or
    package versions) is a UsageError: two evaluations are never mixed.

    ``processes`` (an ``accelerate.PartialState`` under ``accelerate launch``): each process plays every
    world-th batch of trials (``rank_batches``) and writes them to ``out_dir/ranks/rank-NNNNN.json`` after
    every batch; after a barrier the main process merges them into the results.json one process would
    have written (timing aside) and returns it; the other processes return None. A killed launch resumes
    with any number of processes, or in one.
    """
    config.check()
    labels = [a.label for a in agents]
    if len(set(labels)) != len(labels):
        raise UsageError(f"agent labels must be unique, got {labels}")
    for a in agents:  # refused before anything is played
        agent_action_repeat(a.agent, config.action_repeat)
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    if world > 1 and out_dir is None:
        raise UsageError(f"an evaluation in {world} processes needs an output directory for their records")
    tasks = config.tasks()
    batches = trial_batches(len(tasks), config.batch_size)
    header = _new_results(config, tasks, agents)
    finished = {}
    if out_dir is not None:
        finished = {k: p for k, p in played_batches(out_dir, header, batches).items() if p["failure"] is None}
    if finished and rank == 0:
        total = len(agents) * len(config.seeds) * len(batches)
        print(f"resuming the evaluation in {out_dir}: {len(finished)} of its {total} batches of trials were played "
              "there before and are reused", flush=True)
    if world == 1:
        played = dict(finished)
        path = Path(out_dir) / "results.json" if out_dir is not None else None
        for a in agents:
            for seed in config.seeds:
                todo = [b for b in batches if (a.label, seed, b.start) not in played]
                for p in _play_seed(a, seed, todo, tasks, config, f"{a.label} seed {seed}"):
                    played[_batch_key(p)] = p
                    if path is not None:
                        atomic_write_json(path, assemble(header, config.seeds, batches, played))
        results = assemble(header, config.seeds, batches, played)
        if path is not None:  # also when every batch was played before (by the processes of a launch, say)
            atomic_write_json(path, results)
        return results

    mine = rank_batches(len(agents), len(config.seeds), batches, rank, world)
    path = rank_path(out_dir, rank)
    # the finished batches this process's file held stay in it: while the processes read each other's files,
    # none loses a batch another counted as played
    kept = [p for p in read_json(path)["batches"] if p["failure"] is None] if path.is_file() else []
    share = {"format": RANK_FORMAT, "rank": rank, "world": world, **{k: header[k] for k in IDENTITY_KEYS},
             "batches": kept}
    atomic_write_json(path, share)  # a process without batches still says so
    for i, a in enumerate(agents):
        for s, seed in enumerate(config.seeds):
            todo = [b for b in mine[i][s] if (a.label, seed, b.start) not in finished]
            for p in _play_seed(a, seed, todo, tasks, config, f"{a.label} seed {seed} [rank {rank} of {world}]",
                                show=rank == 0):
                share["batches"].append(p)
                atomic_write_json(path, share)
    processes.wait_for_everyone()
    if rank != 0:
        return None
    results = merge_ranks(out_dir, header, config.seeds, batches, world)
    atomic_write_json(Path(out_dir) / "results.json", results)
    return results


def trial_batches(num_tasks: int, batch_size: int) -> list[range]:
    """The task indices of each batch of trials, in the order one process plays them."""
    return [range(start, min(start + batch_size, num_tasks)) for start in range(0, num_tasks, batch_size)]


def rank_batches(num_agents: int, num_seeds: int, batches: Sequence[range], rank: int,
                 world: int) -> list[list[list[range]]]:
    """The batches process ``rank`` of ``world`` plays, by agent and seed: every world-th of the
    (agent, seed, batch) units in the one-process order. Whole batches, never trials: an agent draws its
    random numbers per batch (``start_trials``), so a trial's records depend on the trials beside it."""
    n = len(batches)
    return [[[b for k, b in enumerate(batches) if ((i * num_seeds + s) * n + k) % world == rank]
             for s in range(num_seeds)] for i in range(num_agents)]


def rank_path(out_dir: str | Path, rank: int) -> Path:
    """Where process ``rank`` writes the batches it played."""
    return Path(out_dir) / "ranks" / f"rank-{rank:05d}.json"


def merge_ranks(out_dir: str | Path, header: dict, seeds: Sequence[int], batches: Sequence[range],
                world: int) -> dict:
    """The results of the ``world`` processes' files (and of what earlier runs left in ``out_dir``) in one:
    trials, records and failures in the one-process order, and, as there, an agent's seed stops at its
    first failed batch. ``header``: ``_new_results`` of the evaluation."""
    for rank in range(world):
        path = rank_path(out_dir, rank)
        if not path.is_file():
            raise UsageError(f"no records of process {rank} at {str(path)!r}; on several machines --out must be "
                             f"a directory they share")
    played = played_batches(out_dir, header, batches)
    for label in header["agents"]:
        for seed in seeds:
            for batch in batches:
                p = played.get((label, seed, batch.start))
                if p is None:
                    raise UsageError(f"no process played tasks {batch.start}-{batch.stop - 1} of agent "
                                     f"{label!r} seed {seed} in {out_dir}/ranks; rerun the evaluation")
                if p["failure"] is not None:
                    break
    return assemble(header, seeds, batches, played)


# ------------------------------------------------------------------------------------ resuming
def played_batches(out_dir: str | Path, header: dict, batches: Sequence[range]) -> dict[tuple, dict]:
    """Every batch of trials that runs of this evaluation left in ``out_dir`` (its results.json and the
    processes' ranks/rank-*.json), as ``_play_batch`` returned it, by (agent, seed, first task); of two
    copies of a batch, one without failure. ``header``: ``_new_results`` of the evaluation; a file there
    of another evaluation is a one-line UsageError."""
    out_dir = Path(out_dir)
    found: list[dict] = []
    path = out_dir / "results.json"
    if path.is_file():
        results = read_json(path)
        _check_same(path, results, RESULTS_FORMAT, header, out_dir)
        found += _results_batches(results, batches)
    for path in sorted((out_dir / "ranks").glob("rank-*.json")):
        share = read_json(path)
        _check_same(path, share, RANK_FORMAT, header, out_dir)
        found += share["batches"]
    played: dict[tuple, dict] = {}
    for p in found:
        key = _batch_key(p)
        if key not in played or played[key]["failure"] is not None:
            played[key] = p
    return played


def _batch_key(played: dict) -> tuple[str, int, int]:
    t = played["trial"]
    return t["agent"], t["seed"], t["tasks"][0]


def _results_batches(results: dict, batches: Sequence[range]) -> list[dict]:
    """The batches a results.json holds, each as ``_play_batch`` returned it: its trial, its records in
    their order, its failure (a seed stops at its first failed batch, so a failure is its seed's last
    batch's), and an even share of its seed's seconds."""
    first = {j: b.start for b in batches for j in b}
    out: dict[tuple, dict] = {}
    by_seed: dict[tuple, list[tuple]] = {}  # (agent, seed) -> its batches' keys, in order
    for t in results["trials"]:
        key = (t["agent"], t["seed"], t["tasks"][0])
        out[key] = {"trial": t, "records": [], "failure": None}
        by_seed.setdefault(key[:2], []).append(key)
    for r in results["records"]:
        out[(r["agent"], r["seed"], first[r["task"]])]["records"].append(r)
    for f in results["failures"]:
        out[by_seed[(f["agent"], f["seed"])][-1]]["failure"] = f
    for (label, seed), keys in by_seed.items():
        for key in keys:
            out[key]["seconds"] = results["timing"].get(label, {}).get(str(seed), 0.0) / len(keys)
    return list(out.values())


def _check_same(path: Path, found, file_format: str, header: dict, out_dir: Path) -> None:
    """Raise UsageError if ``found``, read from ``path``, is not a file of the evaluation ``header`` starts."""
    difference = _difference(found, file_format, header)
    if difference:
        raise UsageError(f"{path} was written by another evaluation ({difference}); give this one another --out "
                         f"(or empty {out_dir} to start again): two evaluations are never mixed")


def _difference(found, file_format: str, header: dict) -> str | None:
    """The first thing that tells ``found`` from a file of the evaluation ``header`` starts; None if none."""
    if not isinstance(found, dict) or found.get("format") != file_format:
        return f"it is not of format {file_format!r}"
    if any(k not in found for k in IDENTITY_KEYS):
        return f"it lacks one of {list(IDENTITY_KEYS)}"
    old, new = ({k: v for k, v in s.items() if k not in RESUME_FREE_SETTINGS}
                for s in (found["settings"], header["settings"]))
    for k in [*new, *(k for k in old if k not in new)]:
        if _canonical(old.get(k)) != _canonical(new.get(k)):
            return f"{k} {old.get(k)!r}, not {new.get(k)!r}"
    if _canonical(found["tasks"]) != _canonical(header["tasks"]):
        return "other tasks"
    if list(found["agents"]) != list(header["agents"]):
        return f"agents {list(found['agents'])}, not {list(header['agents'])}"
    for label, info in header["agents"].items():
        old, new = ({k: v for k, v in i.items() if k != "status"} for i in (found["agents"][label], info))
        for k in [*new, *(k for k in old if k not in new)]:
            if _canonical(old.get(k)) != _canonical(new.get(k)):
                return f"agent {label!r}: another {k}"
    for name, version in header["versions"].items():
        if found["versions"].get(name) != version:
            return f"{name} {found['versions'].get(name)}, not {version}"
    return None


def _canonical(value) -> str:
    """``value`` as JSON with sorted keys: tuples and lists, and NaN and NaN, compare equal."""
    return json.dumps(value, sort_keys=True)


def assemble(header: dict, seeds: Sequence[int], batches: Sequence[range], played: dict[tuple, dict]) -> dict:
    """results.json from ``header`` (``_new_results``) and the batches ``played`` so far, by (agent, seed,
    first task): every agent's seeds in order, each up to its first batch not played or its first failed
    one. An agent is 'ok' once every seed is whole, 'failed' once a batch failed, else 'pending'."""
    results = copy.deepcopy(header)
    for label, info in results["agents"].items():
        whole = True
        for seed in seeds:
            seconds, any_played = 0.0, False
            for batch in batches:
                p = played.get((label, seed, batch.start))
                if p is None:
                    whole = False
                    break
                results["trials"].append(p["trial"])
                results["records"].extend(p["records"])
                seconds, any_played = seconds + p["seconds"], True
                if p["failure"] is not None:
                    results["failures"].append(p["failure"])
                    info["status"] = "failed"
                    break
            if any_played:
                results["timing"].setdefault(label, {})[str(seed)] = round(seconds, 3)
        if whole and info["status"] == "pending":
            info["status"] = "ok"
    return results


# ------------------------------------------------------------------------------------- playing
def _settings(config: EvalConfig) -> dict:
    return {**asdict(config), "seeds": list(config.seeds)}


def _play_seed(a: EvalAgent, seed: int, batches: Sequence[range], tasks: Sequence[TaskSpec], config: EvalConfig,
               desc: str, show: bool = True) -> Iterator[dict]:
    """Play ``batches`` of one agent and seed, up to the first that fails; yield each batch as
    ``_play_batch`` returns it, as soon as it is played."""
    if not batches:
        return
    steps = sum(len(b) for b in batches) * (config.adaptation_episodes + config.evaluation_episodes)
    bar = _progress_bar(config, desc, steps * config.episode_length) if show else None
    try:
        for batch in batches:
            played = _play_batch(a, seed, batch, tasks, config, bar)
            yield played
            if played["failure"] is not None:
                return
    finally:
        if bar is not None:
            bar.close()


def _play_batch(a: EvalAgent, seed: int, batch: range, tasks: Sequence[TaskSpec], config: EvalConfig, bar) -> dict:
    """One batch of trials: its entry of results["trials"], its records, its failure (None if none) and
    the wall-clock seconds it took."""
    t0 = time.perf_counter()
    env_seed = trial_seed(seed, batch.start)
    trial = {"agent": a.label, "seed": seed, "tasks": list(batch),
             "env_seeds": [trial_seed(seed, j) for j in batch], "agent_seed": env_seed}
    if config.vector == "pipelined":  # each group is played as a batch of its own
        trial["groups"] = [{"tasks": list(batch)[s], "agent_seed": env_seed + s.start}
                           for s in split_in_two(len(batch))]
    records, failure = [], None
    try:
        for episode_records in play_trials(a.agent, [tasks[j] for j in batch], env_seed, env_seed,
                                           config.adaptation_episodes, config.evaluation_episodes,
                                           config.episode_length, config.vector, bar,
                                           action_repeat=agent_action_repeat(a.agent, config.action_repeat)):
            for j, rec in zip(batch, episode_records):
                records.append({"agent": a.label, "seed": seed, "task": j, "env_name": tasks[j].env_name, **rec})
    except Exception as e:  # the agent's fault, not the user's: record it and go on with the others
        failure = {"agent": a.label, "seed": seed, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=5)}
    return {"trial": trial, "records": records, "failure": failure,
            "seconds": round(time.perf_counter() - t0, 3)}


def _progress_bar(config: EvalConfig, desc: str, total: int):
    if not config.progress:
        return None
    return tqdm(total=total, desc=desc, unit="step", unit_scale=True, leave=False)


def load_results(path: str | Path) -> dict:
    """Read a results.json written by ``evaluate`` (a directory or the file itself); a directory whose
    results.json was committed gzip-compressed (``results.json.gz``, as large ones under results/ are) is
    read from that."""
    path = Path(path)
    if path.is_dir():
        plain, packed = path / "results.json", path / "results.json.gz"
        path = packed if packed.is_file() and not plain.is_file() else plain
    if not path.is_file():
        raise UsageError(f"no results file at {str(path)!r}")
    results = read_json(path)
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise UsageError(f"{path} is not an evaluation results file (format {RESULTS_FORMAT!r})")
    return results


def without_timing(results: dict) -> dict:
    """The results minus wall-clock fields: what two runs of the same command must agree on."""
    return {k: v for k, v in results.items() if k not in TIMING_KEYS}
