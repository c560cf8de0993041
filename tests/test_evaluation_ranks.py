"""The evaluator under several processes: each plays a share of the batches, the main one merges them
into what one process would have written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import KilledAt

from icl_metarl.harness.agent import Agent
from icl_metarl.harness.baselines import make_baseline
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import (
    EvalAgent,
    EvalConfig,
    evaluate,
    load_results,
    rank_batches,
    rank_path,
    trial_batches,
    trial_seed,
    without_timing,
)
from icl_metarl.study.cli import main

TINY = dict(suite="ML1:reach-v3", num_tasks=5, adaptation_episodes=1, evaluation_episodes=1, episode_length=10,
            seeds=(0, 1), batch_size=2, progress=False)


class Processes:
    """One of ``world`` processes, played one after the other in this one: the barrier is a no-op, so
    the main process (rank 0) must run last."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world

    def wait_for_everyone(self):
        pass


class FailsOnBatch(Agent):
    """Random actions; raises at its 12th step of the batch whose first task is ``start``, whatever it
    played before (so that the failure does not depend on how batches are shared out)."""

    name = "fails"

    def __init__(self, start):
        self.start, self.failing, self.steps, self.rng = start, False, 0, None

    def start_trials(self, num_trials, seed):
        self.failing = seed % 1_000_003 == self.start
        self.steps, self.rng = 0, np.random.default_rng(seed)

    def act(self, obs):
        self.steps += 1
        if self.failing and self.steps > 12:
            raise RuntimeError("boom")
        return self.rng.uniform(-1, 1, (len(obs), 4)).astype(np.float32)


def _agents():
    return [EvalAgent("fails", FailsOnBatch(start=2)), EvalAgent("random", make_baseline("random")),
            EvalAgent("oracle", make_baseline("oracle"))]


@pytest.mark.parametrize("world", [1, 2, 3, 7, 40])
def test_every_batch_is_played_by_exactly_one_process(world):
    batches = trial_batches(5, 2)
    assert batches == [range(0, 2), range(2, 4), range(4, 5)]
    played = [(i, s, b.start) for r in range(world) for i, by_seed in enumerate(rank_batches(3, 2, batches, r, world))
              for s, bs in enumerate(by_seed) for b in bs]
    assert sorted(played) == [(i, s, b.start) for i in range(3) for s in range(2) for b in batches]
    counts = [sum(len(bs) for by_seed in rank_batches(3, 2, batches, r, world) for bs in by_seed) for r in range(world)]
    assert max(counts) - min(counts) <= 1  # 18 units dealt round-robin


@pytest.mark.slow  # test_accelerate_launch_with_two_processes_equals_one is this file's default representative
@pytest.mark.parametrize("world", [3])
def test_processes_merge_into_the_one_process_results(tmp_path, world):
    one = evaluate(_agents(), EvalConfig(**TINY), tmp_path / "one")
    for rank in reversed(range(world)):  # the main process merges, so it comes last here
        merged = evaluate(_agents(), EvalConfig(**TINY), tmp_path / "many", Processes(rank, world))
        assert (merged is None) == (rank != 0)
    assert without_timing(merged) == without_timing(one) == without_timing(load_results(tmp_path / "many"))
    assert [f["seed"] for f in one["failures"]] == [0, 1] and one["agents"]["fails"]["status"] == "failed"
    # the failing agent stops each seed at batch 2-3, as one process does, though another process played 4
    assert [t["tasks"] for t in merged["trials"] if t["agent"] == "fails"] == [[0, 1], [2, 3]] * 2
    assert merged["trials"][2]["env_seeds"] == [trial_seed(1, 0), trial_seed(1, 1)]
    assert set(merged["timing"]) == {"fails", "random", "oracle"}


def _killed(killed_at=None):
    """``_agents()`` with the random agent killed in its ``killed_at``-th batch (None: never)."""
    agents = _agents()
    agents[1].agent = KilledAt(agents[1].agent, killed_at)
    return agents


def _run(out, world, killed=None):
    """One launch of ``world`` processes into ``out``, the main one last; ``killed``: (rank, n) whose random
    agent is killed in its n-th batch, which ends the launch there (the barrier is never reached)."""
    for rank in reversed(range(world)):
        n = killed[1] if killed and killed[0] == rank else None
        if n is None:
            results = evaluate(_killed(), EvalConfig(**TINY), out, Processes(rank, world) if world > 1 else None)
            continue
        with pytest.raises(KeyboardInterrupt):
            evaluate(_killed(n), EvalConfig(**TINY), out, Processes(rank, world) if world > 1 else None)
        return None
    return results


@pytest.mark.slow  # a multi-process representative of this file stays in the default suite
@pytest.mark.parametrize("first, then", [
    ((3, (1, 2)), 2),  # three processes, the second killed in its 2nd batch of random's; resumed in two
    ((3, (2, 1)), 1),  # ... the third killed in its first; resumed in one process
    ((1, (0, 4)), 2),  # one process killed in random's seed 1; resumed in two
])
def test_a_killed_launch_resumes_equal_to_one_process(tmp_path, first, then):
    one = evaluate(_agents(), EvalConfig(**TINY))
    world, killed = first
    assert _run(tmp_path, world, killed) is None
    resumed = _run(tmp_path, then)
    assert without_timing(resumed) == without_timing(one) == without_timing(load_results(tmp_path))
    assert [f["seed"] for f in resumed["failures"]] == [0, 1]  # played again, and failed again, on resume


def test_a_missing_or_foreign_process_file_is_a_one_line_error(tmp_path):
    cfg = EvalConfig(**{**TINY, "seeds": (0,)})
    agents = [EvalAgent("random", make_baseline("random"))]
    with pytest.raises(UsageError, match="no records of process 1 at .*rank-00001.json") as e:
        evaluate(agents, cfg, tmp_path, Processes(0, 2))
    assert "\n" not in str(e.value)
    evaluate(agents, EvalConfig(**{**TINY, "seeds": (0,), "episode_length": 11}), tmp_path / "b", Processes(1, 2))
    with pytest.raises(UsageError, match="rank-00001.json was written by another evaluation \\(episode_length 11, "
                                         "not 10\\); give this one another --out") as e:
        evaluate(agents, cfg, tmp_path / "b", Processes(0, 2))
    assert "\n" not in str(e.value) and not rank_path(tmp_path / "b", 0).exists()  # refused before it played
    with pytest.raises(UsageError, match="2 processes needs an output directory"):
        evaluate(agents, cfg, None, Processes(0, 2))


def _launch(tmp_path, out, argv, port):
    """``accelerate launch`` two processes of ``icl-metarl`` (``python -m icl_metarl.study.cli``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m", "icl_metarl.study.cli"]
    return subprocess.run(launch + argv + ["--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)


def _two_processes_equal_one(tmp_path, argv, port):
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    r = _launch(tmp_path, tmp_path / "two", argv, port)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only the main process reports
    assert sorted(p.name for p in (tmp_path / "two" / "ranks").iterdir()) == ["rank-00000.json", "rank-00001.json"]
    assert rank_path(tmp_path / "two", 1).is_file()
    one, two = load_results(tmp_path / "one"), load_results(tmp_path / "two")
    assert without_timing(two) == without_timing(one) and not one["failures"]
    assert (tmp_path / "two" / "report.md").read_text() == (tmp_path / "one" / "report.md").read_text()
    return one


def test_accelerate_launch_with_two_processes_equals_one(tmp_path):
    argv = ["evaluate", "random", "oracle", "--suite", "ML1:reach-v3", "--tasks", "4", "--seeds", "0", "1",
            "-K", "1", "-E", "1", "--episode-length", "10", "--batch-size", "2", "--no-progress", "--bootstrap", "50"]
    one = _two_processes_equal_one(tmp_path, argv, 29641)
    assert len(one["records"]) == 2 * 2 * 4 * 2


@pytest.mark.slow
def test_accelerate_launch_ml10_one_task_per_environment(tmp_path):
    argv = ["evaluate", "random", "oracle", "--suite", "ML10", "--tasks-per-env", "1", "--seeds", "0", "1",
            "-K", "1", "-E", "1", "--episode-length", "10", "--batch-size", "2", "--no-progress", "--bootstrap", "50"]
    one = _two_processes_equal_one(tmp_path, argv, 29643)
    assert len({t["env_name"] for t in one["tasks"]}) == 5 == len(one["tasks"])
