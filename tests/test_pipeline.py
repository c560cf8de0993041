"""The pipelined evaluator: two worker groups give the same records as sync play with half the batch."""

import os
import signal

import numpy as np
import pytest
import torch

from gradient_meta.meta_rl import MetaRLConfig, meta_train
from gradient_meta.rl_agent import load_agent as load_gradient_agent
from icl_metarl.harness.baselines import make_baseline
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalAgent, EvalConfig, evaluate
from icl_metarl.harness.pipeline import EnvGroupWorker, WorkerError, split_in_two
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import TaskSpec, get_suite, make_trial_envs
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig

SETTINGS = dict(suite="ML1:reach-v3", num_tasks=4, adaptation_episodes=2, evaluation_episodes=1,
                episode_length=10, seeds=(0,), progress=False)


def _records(results):
    return sorted((r["agent"], r["task"], r["episode"], r["return"], r["success"], r["steps_to_success"])
                  for r in results["records"])


@pytest.mark.filterwarnings("ignore:trials are longer than the trained context")
def test_pipelined_records_equal_sync_with_half_batches(tmp_path):
    torch.manual_seed(0)
    icl = ICLPolicy(ICLPolicyConfig(d_model=32, n_layer=1, n_head=2, max_episode_length=10, max_context_episodes=2))
    meta_train(MetaRLConfig(algo="maml", iterations=1, meta_batch=2, episode_length=10, hidden=(8,), ppo_epochs=1),
               tmp_path / "maml", progress=False)
    agents = [
        EvalAgent("random", make_baseline("random")),  # random numbers from the agent seed
        EvalAgent("oracle", make_baseline("oracle")),  # privileged: the goals travel from the workers
        # exploration offsets come from the agent seed; 3 episodes > 2 in context: a window re-encoding
        EvalAgent("icl", InContextAgent(icl, explore_episodes=1, explore_scale=0.5)),
        EvalAgent("maml", load_gradient_agent(tmp_path / "maml")),  # samples actions, adapts its weights
    ]
    sync = evaluate(agents, EvalConfig(**SETTINGS, batch_size=2, vector="sync"))
    piped = evaluate(agents, EvalConfig(**SETTINGS, batch_size=4, vector="pipelined"))
    assert not sync["failures"] and not piped["failures"]
    assert len(piped["records"]) == 4 * 4 * 3
    assert _records(piped) == _records(sync)
    # the pipelined figures differ from sync play of the whole batch at once only by the agent seeds
    whole = evaluate(agents[:1], EvalConfig(**SETTINGS, batch_size=4, vector="sync"))
    assert _records(whole) != [r for r in _records(sync) if r[0] == "random"]
    assert piped["trials"][0]["groups"] == [{"tasks": [0, 1], "agent_seed": 0}, {"tasks": [2, 3], "agent_seed": 2}]


def test_split_in_two():
    assert split_in_two(1) == [slice(0, 1)]
    assert split_in_two(5) == [slice(0, 3), slice(3, 5)]
    assert split_in_two(50) == [slice(0, 25), slice(25, 50)]


def test_worker_steps_the_same_environments_as_this_process():
    tasks = get_suite("ML1:reach-v3").tasks("test")[:2]
    here = make_trial_envs(tasks, 5, seed=7)
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 2, 4)).astype(np.float32)
    with EnvGroupWorker(tasks, 5, seed=7) as worker:
        for a, b in zip(here.reset(), worker.reset()):
            np.testing.assert_array_equal(a if not isinstance(a, dict) else a["goal"],
                                          b if not isinstance(b, dict) else b["goal"])
        for act in actions:
            mine = here.step(act)
            worker.step_async(act)
            theirs = worker.step_wait()
            np.testing.assert_array_equal(mine[0], theirs[0])
            np.testing.assert_array_equal(mine[1], theirs[1])
            np.testing.assert_array_equal(mine[4]["success"], theirs[4]["success"])
        with pytest.raises(RuntimeError, match="waiting for step, but None is pending"):
            worker.step_wait()
    here.close()


def test_a_worker_that_cannot_start_or_dies_is_a_one_line_error():
    with EnvGroupWorker([TaskSpec("nope-v3", (0.0,) * 9)], 5) as worker:
        with pytest.raises(WorkerError, match="building the environments: UsageError: unknown Meta-World "
                                              "environment 'nope-v3'") as e:
            worker.reset()
        assert "\n" not in str(e.value)
    tasks = get_suite("ML1:reach-v3").tasks("test")[:1]
    with EnvGroupWorker(tasks, 5) as worker:
        worker.reset()
        os.kill(worker._process.pid, signal.SIGKILL)
        worker._process.join()
        with pytest.raises(WorkerError, match="environment worker died (before|during) step"):
            worker.step(np.zeros((1, 4), dtype=np.float32))


def test_unknown_vector_mode_names_the_choices():
    tasks = get_suite("ML1:reach-v3").tasks("test")[:1]
    with pytest.raises(UsageError, match="'threads'.*sync, async, pipelined"):
        next(play_trials(make_baseline("random"), tasks, 0, 0, 1, 0, 5, vector="threads"))
