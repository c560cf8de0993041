import numpy as np
import pytest

from icl_metarl.harness.agent import Privileged
from icl_metarl.harness.baselines import OracleAgent, RandomAgent, make_baseline
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.suites import expert_policy, get_suite, make_trial_envs


def test_random_is_in_range_and_repeats_with_its_seed():
    a, b = RandomAgent(), RandomAgent()
    obs = np.zeros((5, 39))
    a.start_trials(5, seed=3)
    b.start_trials(5, seed=3)
    x, y = a.act(obs), b.act(obs)
    assert x.shape == (5, 4) and x.dtype == np.float32
    assert np.all(np.abs(x) <= 1.0)
    np.testing.assert_array_equal(x, y)
    b.start_trials(5, seed=4)
    assert not np.array_equal(a.act(obs), b.act(obs))


def test_oracle_matches_expert_called_directly():
    tasks = get_suite("ML1:reach-v3").tasks("test", 0)[:3]
    envs = make_trial_envs(tasks, episode_length=10)
    obs, info = envs.reset()
    for offsets, shift in (((), 0.0), (("reach-v3=0,0,0.045",), 0.045)):  # told the true goal, or aim the TCP
        oracle = OracleAgent(expert_goal_offsets=offsets)
        oracle.start_trials(3, 0)
        got = oracle.act_privileged(obs, Privileged([t.env_name for t in tasks], info["goal"]))
        for i, t in enumerate(tasks):  # second way: the expert on a copy of obs with the goal filled in
            o = obs[i].copy()
            o[-3:] = info["goal"][i] + np.array([0.0, 0.0, shift])
            np.testing.assert_allclose(got[i], np.clip(expert_policy(t.env_name).get_action(o), -1, 1), rtol=1e-6)
    assert np.all(obs[:, -3:] == 0)  # the observation itself stays goal-free
    envs.close()


def test_oracle_refuses_to_act_without_the_goal():
    assert OracleAgent.privileged and not RandomAgent.privileged
    with pytest.raises(NotImplementedError):
        OracleAgent().act(np.zeros((1, 39)))


def test_make_baseline_names():
    assert isinstance(make_baseline("random"), RandomAgent)
    assert isinstance(make_baseline("oracle"), OracleAgent)
    with pytest.raises(UsageError, match="unknown baseline 'expert'.*random, oracle"):
        make_baseline("expert")
    assert "task_pool" in make_baseline("oracle").describe()
