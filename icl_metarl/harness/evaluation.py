"""The shared evaluator: every agent plays the same test tasks, in the same order, with the same seeds,
K adaptation then E evaluation episodes per trial, and every episode's outcome goes to results.json.

Not for: tables and plots (``report.py``), Meta-World's own evaluation function (``mw_adapter.py``).
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from icl_metarl.harness.agent import Agent, Privileged
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import atomic_write_json, read_json, versions
from icl_metarl.harness.suites import (
    ACT_DIM,
    DEFAULT_EPISODE_LENGTH,
    VECTOR_MODES as ENV_VECTOR_MODES,
    TaskSpec,
    check_episode_length,
    check_split,
    get_suite,
    make_trial_envs,
)

RESULTS_FORMAT = "icl_metarl.harness.evaluation/1"
#: keys of results.json that hold wall-clock figures: the only ones allowed to differ between two runs
TIMING_KEYS = ("timing",)
CHECKPOINT_TYPES = ("icl_metarl_policy", "gradient_meta_rl")
#: how a batch's environments run: gymnasium's sync/async vector envs, or two worker groups overlapped
#: with the agent's steps (``pipeline.py``)
VECTOR_MODES = (*ENV_VECTOR_MODES, "pipelined")


@dataclass
class EvalConfig:
    """What an evaluation plays; the same for every agent in it."""

    suite: str = "ML1:reach-v3"
    """Meta-World suite: ML1:<env>-v3, ML10 or ML45."""
    split: str = "test"
    """Which split's tasks to play; train is a diagnostic only (the agents may have seen them)."""
    adaptation_episodes: int = 10
    """K: episodes per trial in which the agent may adapt (Meta-World's benchmark uses 10)."""
    evaluation_episodes: int = 3
    """E: episodes after the adaptation ones, whose success is the benchmark's figure (3)."""
    episode_length: int = DEFAULT_EPISODE_LENGTH
    """Steps per episode (Meta-World's 500); episodes never end early."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Evaluation seeds: each seeds the environments and the agent's random numbers."""
    num_tasks: int | None = None
    """Play only the first N tasks of the split (None: all of them)."""
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
        get_suite(self.suite)
        check_split(self.split)
        check_episode_length(self.episode_length)
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
        return tasks


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


# ------------------------------------------------------------------------------------- loading
def load_agent(spec: str, adaptive: bool = True, in_context: dict | None = None) -> Agent:
    """A baseline by name (random, oracle) or a checkpoint directory whose config.json names its type.

    ``adaptive=False`` gives a checkpoint's non-adaptive variant (in-context: context wiped every
    episode; gradient: no adaptation step). ``in_context``: keyword arguments for in-context agents
    only (e.g. explore_episodes). The learners' modules are imported only when needed.
    """
    from icl_metarl.harness.baselines import BASELINES, make_baseline

    if spec in BASELINES:
        return make_baseline(spec)
    path = Path(spec)
    if not path.is_dir():
        raise UsageError(
            f"agent {spec!r} is neither a baseline ({', '.join(BASELINES)}) nor an existing checkpoint directory"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"checkpoint directory {spec!r} has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UsageError(f"{config_file} is not a JSON object: {e}") from None
    if model_type == "icl_metarl_policy":
        from icl_metarl.incontext.agent import InContextAgent

        return InContextAgent.from_pretrained(path, wipe_context_each_episode=not adaptive, **(in_context or {}))
    if model_type == "gradient_meta_rl":
        from gradient_meta.rl_agent import load_agent as load_gradient_agent

        return load_gradient_agent(path, adaptive=adaptive)
    raise choice_error(f"model_type in {config_file}", model_type, CHECKPOINT_TYPES)


def load_agents(specs: Sequence[str], non_adaptive: bool = False, in_context: dict | None = None) -> list[EvalAgent]:
    """Agents for the command line, with unique labels; ``non_adaptive`` adds each checkpoint's variant."""
    from icl_metarl.harness.baselines import BASELINES

    if len(specs) == 0:
        raise UsageError("no agents to evaluate; give baseline names (random, oracle) or checkpoint directories")
    out: list[EvalAgent] = []
    for spec in specs:
        variants = [True] if spec in BASELINES or not non_adaptive else [True, False]
        for adaptive in variants:
            agent = load_agent(spec, adaptive=adaptive, in_context=in_context)
            base = spec if spec in BASELINES else (getattr(agent, "name", "") or Path(spec).name)
            if base in ("agent", ""):
                base = Path(spec).name
            out.append(EvalAgent(base if adaptive else f"{base} [non-adaptive]", agent, spec, adaptive))
    seen: dict[str, int] = {}
    for a in out:  # two checkpoints with the same name still get distinct rows
        seen[a.label] = seen.get(a.label, 0) + 1
        if seen[a.label] > 1:
            a.label = f"{a.label} #{seen[a.label]}"
    return out


# ------------------------------------------------------------------------------------- playing
def play_trials(
    agent: Agent,
    tasks: Sequence[TaskSpec],
    env_seed: int,
    agent_seed: int,
    adaptation_episodes: int,
    evaluation_episodes: int,
    episode_length: int,
    vector: str = "sync",
    progress=None,
) -> Iterator[list[dict]]:
    """Play one trial per task in lockstep; yield, after each episode, one record per trial.

    A record: episode index, phase, success (``info["success"]`` ever 1), return, and the 1-based step
    of the first success (None if none). Episodes run their full length whatever happens, so the
    success of an episode does not change how long the agent's later episodes are.

    ``vector="pipelined"``: the trials are split into two groups (``pipeline.split_in_two``), each with
    its environments in a worker process and its own copy of the agent; while one group's environments
    step, the other group's actions are computed. Group g plays exactly as this function would play its
    tasks alone with ``env_seed + offset`` and ``agent_seed + offset`` (offset: its first trial's index),
    which is what the evaluator does for consecutive batches: the records equal those of a sync run
    with batches of half the size.
    """
    groups = trial_groups(agent, tasks, vector)
    envs = []
    try:
        for _, group_tasks, offset in groups:  # workers start (import Meta-World) in parallel
            envs.append(make_group_envs(group_tasks, episode_length, env_seed + offset, vector))
        yield from play_lockstep(groups, envs, agent_seed, adaptation_episodes, evaluation_episodes,
                                 episode_length, progress)
    finally:
        for env in envs:
            env.close()


def trial_groups(agent: Agent, tasks: Sequence[TaskSpec], vector: str) -> list[tuple[Agent, list[TaskSpec], int]]:
    """The (agent, tasks, offset of its first trial) groups a batch is played in: one group, or for
    ``pipelined`` two halves, the second played by ``agent.fork()`` (its own context or adapted weights)."""
    if vector not in VECTOR_MODES:
        raise choice_error("vector mode", vector, VECTOR_MODES)
    if vector != "pipelined":
        return [(agent, list(tasks), 0)]
    from icl_metarl.harness.pipeline import split_in_two

    return [(agent if g == 0 else agent.fork(), list(tasks[s]), s.start)
            for g, s in enumerate(split_in_two(len(tasks)))]


def make_group_envs(tasks: list[TaskSpec], episode_length: int, seed: int, vector: str):
    """The environments of one group of trials: a worker process (pipelined) or a vector env here."""
    from icl_metarl.harness.pipeline import EnvGroupWorker, InProcessEnvs

    if vector == "pipelined":
        return EnvGroupWorker(tasks, episode_length, seed)
    return InProcessEnvs(make_trial_envs(tasks, episode_length, seed=seed, mode=vector))


def play_lockstep(groups, envs, agent_seed: int, adaptation_episodes: int, evaluation_episodes: int,
                  episode_length: int, progress=None) -> Iterator[list[dict]]:
    """The lockstep loop of ``play_trials`` on groups of (agent, tasks, offset) and their built
    environments (``make_group_envs``), which the caller closes; one group is the plain lockstep loop."""
    for (agent, tasks, offset), env in zip(groups, envs):
        env.wait_started()
        agent.start_trials(len(tasks), agent_seed + offset)
    n = [len(tasks) for _, tasks, _ in groups]
    names = [[t.env_name for t in tasks] for _, tasks, _ in groups]

    def act(g: int, obs, info) -> np.ndarray:
        agent = groups[g][0]
        if agent.privileged:
            actions = agent.act_privileged(obs, Privileged(names[g], np.asarray(info["goal"])))
        else:
            actions = agent.act(obs)
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (n[g], ACT_DIM) or not np.all(np.isfinite(actions)):
            raise ValueError(f"agent returned actions of shape {actions.shape} (want {(n[g], ACT_DIM)}) "
                             f"or non-finite values")
        return actions

    for episode in range(adaptation_episodes + evaluation_episodes):
        ret = [np.zeros(k) for k in n]
        first = [np.zeros(k, dtype=np.int64) for k in n]  # 0 = no success yet
        for env in envs:
            env.reset_async()
        for g, env in enumerate(envs):
            obs, info = env.reset_wait()
            env.step_async(act(g, obs, info))
        for t in range(episode_length):
            for g, env in enumerate(envs):
                obs, reward, _, _, info = env.step_wait()
                success = np.asarray(info["success"], dtype=np.float64)
                groups[g][0].observe(np.asarray(reward, dtype=np.float64), success)
                ret[g] += reward
                first[g] = np.where((first[g] == 0) & (success >= 1.0), t + 1, first[g])
                if t + 1 < episode_length:  # the other groups' environments step meanwhile
                    env.step_async(act(g, obs, info))
            if progress is not None:
                progress.update(sum(n))
        for agent, _, _ in groups:
            agent.end_episode()
        phase = "adaptation" if episode < adaptation_episodes else "evaluation"
        yield [
            {
                "episode": episode,
                "phase": phase,
                "success": bool(f[i] > 0),
                "return": float(r[i]),
                "steps_to_success": int(f[i]) if f[i] > 0 else None,
            }
            for r, f in zip(ret, first)
            for i in range(len(r))
        ]


def _new_results(config: EvalConfig, tasks: Sequence[TaskSpec], agents: Sequence[EvalAgent]) -> dict:
    return {
        "format": RESULTS_FORMAT,
        "settings": {**asdict(config), "seeds": list(config.seeds)},
        "diagnostic": config.split != "test",  # train-split figures say nothing about adaptation to new tasks
        "tasks": [{"index": j, **t.to_json()} for j, t in enumerate(tasks)],
        "seeds": list(config.seeds),
        "versions": versions(),
        "agents": {
            a.label: {"spec": a.spec, "adaptive": a.adaptive, "status": "pending", "description": _describe(a.agent)}
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


def evaluate(agents: Sequence[EvalAgent], config: EvalConfig, out_dir: str | Path | None = None) -> dict:
    """Play every agent on the same trials; return the results dict, written to ``out_dir/results.json``
    after every agent and seed, so an agent that raises loses none of what was computed before.
    """
    config.check()
    labels = [a.label for a in agents]
    if len(set(labels)) != len(labels):
        raise UsageError(f"agent labels must be unique, got {labels}")
    tasks = config.tasks()
    results = _new_results(config, tasks, agents)
    path = Path(out_dir) / "results.json" if out_dir is not None else None
    K, E, L = config.adaptation_episodes, config.evaluation_episodes, config.episode_length

    for a in agents:
        status = "ok"
        for seed in config.seeds:
            t0 = time.perf_counter()
            bar = _progress_bar(config, f"{a.label} seed {seed}", len(tasks) * (K + E) * L)
            try:
                for start in range(0, len(tasks), config.batch_size):
                    batch = list(range(start, min(start + config.batch_size, len(tasks))))
                    env_seed = trial_seed(seed, start)
                    trial = {"agent": a.label, "seed": seed, "tasks": batch,
                             "env_seeds": [trial_seed(seed, j) for j in batch], "agent_seed": env_seed}
                    if config.vector == "pipelined":  # each group is played as a batch of its own
                        from icl_metarl.harness.pipeline import split_in_two

                        trial["groups"] = [{"tasks": batch[s], "agent_seed": env_seed + s.start}
                                           for s in split_in_two(len(batch))]
                    results["trials"].append(trial)
                    for episode_records in play_trials(a.agent, [tasks[j] for j in batch], env_seed, env_seed,
                                                       K, E, L, config.vector, bar):
                        for j, rec in zip(batch, episode_records):
                            results["records"].append({"agent": a.label, "seed": seed, "task": j,
                                                       "env_name": tasks[j].env_name, **rec})
            except Exception as e:  # the agent's fault, not the user's: record it and go on with the others
                status = "failed"
                results["failures"].append({"agent": a.label, "seed": seed, "error": f"{type(e).__name__}: {e}",
                                            "traceback": traceback.format_exc(limit=5)})
            finally:
                if bar is not None:
                    bar.close()
            results["timing"].setdefault(a.label, {})[str(seed)] = round(time.perf_counter() - t0, 3)
            results["agents"][a.label]["status"] = status
            if path is not None:
                atomic_write_json(path, results)
    return results


def _progress_bar(config: EvalConfig, desc: str, total: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", unit_scale=True, leave=False)


def load_results(path: str | Path) -> dict:
    """Read a results.json written by ``evaluate`` (a directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UsageError(f"no results file at {str(path)!r}")
    results = read_json(path)
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise UsageError(f"{path} is not an evaluation results file (format {RESULTS_FORMAT!r})")
    return results


def without_timing(results: dict) -> dict:
    """The results minus wall-clock fields: what two runs of the same command must agree on."""
    return {k: v for k, v in results.items() if k not in TIMING_KEYS}
