import numpy as np
import pytest

from icl_metarl.harness.agent import Agent
from icl_metarl.harness.baselines import make_baseline
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalAgent, EvalConfig, evaluate, trial_seed
from icl_metarl.harness.mw_adapter import MetaWorldAdapter, evaluate_with_metaworld, metaworld_vector_env

CFG = dict(suite="ML1:reach-v3", num_tasks=3, adaptation_episodes=1, evaluation_episodes=2,
           episode_length=100, seeds=(0,), progress=False)


def _ours(name, fields=("success",), **changes):
    """The tasks and, per field, our evaluator's per-task mean over the evaluation episodes."""
    cfg = EvalConfig(**{**CFG, **changes})
    res = evaluate([EvalAgent(name, make_baseline(name))], cfg)
    per_task = [[np.mean([r[f] for r in res["records"] if r["task"] == j and r["phase"] == "evaluation"])
                 for j in range(3)] for f in fields]
    return cfg.tasks(), *per_task


def test_oracle_same_success_per_task_through_metaworld():
    tasks, ours = _ours("oracle")
    mw = evaluate_with_metaworld(make_baseline("oracle"), tasks, [trial_seed(0, j) for j in range(3)], 1, 2, 100)
    assert [c["success"] for c in mw["calls"]] == ours  # deterministic agent, same tasks: exactly equal
    assert mw["success"] == pytest.approx(np.mean(ours)) and np.mean(ours) >= 0.8


def test_random_same_returns_through_metaworld():
    """The random agent draws the same actions on both sides, so every figure is equal, not just close.

    One trial per batch (batch_size 1) seeds its actions with the trial's seed, as the adapter does for
    its one-task calls. It never succeeds on reach in 100 steps, so Meta-World's terminate-on-success
    never cuts an episode short and the two action streams stay aligned to the last step."""
    tasks, success, ours = _ours("random", ("success", "return"), batch_size=1)
    mw = evaluate_with_metaworld(make_baseline("random"), tasks, [trial_seed(0, j) for j in range(3)], 1, 2, 100)
    assert success == [0.0, 0.0, 0.0] and [c["success"] for c in mw["calls"]] == success
    assert [c["return"] for c in mw["calls"]] == pytest.approx(ours, rel=1e-12)  # no torch kernel in between
    assert len({round(r, 3) for r in ours}) == 3  # the tasks differ, so a mix-up of tasks or seeds shows


class Recorder(Agent):
    """Counts the protocol calls the adapter makes."""

    name = "recorder"

    def __init__(self, partial_ok=False):
        self.calls = []
        if partial_ok:
            self.end_episodes = lambda done: self.calls.append(("end_some", tuple(done)))

    def start_trials(self, num_trials, seed):
        self.calls.append(("start", num_trials, seed))

    def act(self, obs):
        self.calls.append(("act",))
        return np.zeros((len(obs), 4), dtype=np.float32)

    def observe(self, reward, success):
        self.calls.append(("observe", float(reward[0]), float(success[0])))

    def end_episode(self):
        self.calls.append(("end",))


def test_adapter_keeps_the_trial_across_metaworld_resets():
    tasks = EvalConfig(**CFG).tasks()[:1]
    agent = Recorder()
    evaluate_with_metaworld(agent, tasks, [5], adaptation_episodes=2, evaluation_episodes=3, episode_length=20, seed=7)
    kinds = [c[0] for c in agent.calls]
    assert agent.calls[0] == ("start", 1, 7) and kinds.count("start") == 1  # reset(mask) never starts a trial
    assert kinds.count("end") == 5  # 2 + 3 episode boundaries, none doubled by the reset before evaluation
    assert kinds.count("act") == kinds.count("observe") == 5 * 20  # rewards reach the agent in evaluation too
    for i, k in enumerate(kinds):
        if k == "act":
            assert kinds[i + 1] == "observe"


def test_partial_episode_ends_need_end_episodes():
    tasks = EvalConfig(**CFG).tasks()[:2]
    for partial_ok in (False, True):
        agent = Recorder(partial_ok)
        adapter = MetaWorldAdapter(agent)
        envs = adapter.wrap(metaworld_vector_env(tasks, 20, [0, 1]))
        envs.call("sample_tasks")
        adapter.init()
        obs, _ = envs.reset()
        envs.step(adapter.eval_action(obs))
        if partial_ok:
            adapter.reset(np.array([True, False]))
            assert agent.calls[-1] == ("end_some", (True, False))
        else:
            with pytest.raises(UsageError, match="lockstep only"):
                adapter.reset(np.array([True, False]))
        envs.close()
