import numpy as np
import pytest

from icl_metarl.harness.baselines import RandomAgent
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import get_suite, make_trial_envs

LENGTH = 6


@pytest.fixture(scope="module")
def tasks():
    return get_suite("ML1:reach-v3").tasks("test")[:2]


class Spy(RandomAgent):
    """Random actions; remembers every observation it acted on, every action, and every start."""

    def __init__(self):
        super().__init__()
        self.seen, self.starts = [], []

    def start_trials(self, num_trials, seed):
        super().start_trials(num_trials, seed)
        self.starts.append(seed)

    def act(self, obs):
        actions = super().act(obs)
        self.seen.append((obs.copy(), actions.copy()))
        return actions


def test_on_step_sees_every_step_in_order_with_the_obs_the_action_was_chosen_on(tasks):
    spy, steps = Spy(), []

    def hook(episode, t, obs, info, actions, reward, success):
        steps.append((episode, t, obs.copy(), np.asarray(info["goal"]).copy(), actions.copy(), reward.copy(),
                      success.copy()))

    records = list(play_trials(spy, tasks, 3, 4, 1, 1, LENGTH, on_step=hook))
    assert [(e, t) for e, t, *_ in steps] == [(e, t) for e in range(2) for t in range(LENGTH)]
    for (_, _, obs, _, actions, *_), (seen_obs, seen_actions) in zip(steps, spy.seen, strict=True):
        np.testing.assert_array_equal(obs, seen_obs)
        np.testing.assert_array_equal(actions, seen_actions)
    for e, episode_records in enumerate(records):
        rewards = np.stack([s[5] for s in steps if s[0] == e])  # (L, B)
        np.testing.assert_allclose([r["return"] for r in episode_records], rewards.sum(0))
    # Second way: step the same environments by hand with the same actions; the hook saw each step's
    # observation before the step, its goal, and the step's own reward.
    envs = make_trial_envs(tasks, LENGTH, seed=3)
    for e in range(2):
        obs, info = envs.reset()
        for t in range(LENGTH):
            _, _, want_obs, want_goal, actions, hook_reward, hook_success = steps[e * LENGTH + t]
            np.testing.assert_array_equal(obs, want_obs)
            np.testing.assert_array_equal(info["goal"], want_goal)
            obs, reward, _, _, info = envs.step(actions)
            np.testing.assert_array_equal(reward, hook_reward)
            np.testing.assert_array_equal(info["success"], hook_success)
    envs.close()
    assert not np.array_equal(steps[0][2], steps[LENGTH - 1][2])  # the arm moved: obs are not all alike


def test_given_envs_are_reset_every_episode_and_left_open(tasks):
    envs = make_trial_envs(tasks, LENGTH, seed=5)
    resets = []
    reset = envs.reset
    envs.reset = lambda **kw: resets.append(1) or reset(**kw)
    first = list(play_trials(RandomAgent(), tasks, 999, 1, 2, 1, LENGTH, envs=envs))
    assert len(resets) == 3 and not envs.closed
    again = list(play_trials(RandomAgent(), tasks, 999, 1, 2, 1, LENGTH, envs=envs))
    assert len(resets) == 6 and not envs.closed
    # The same episodes as on environments the loop builds itself with their seed (env_seed is unused).
    built = list(play_trials(RandomAgent(), tasks, 5, 1, 2, 1, LENGTH))
    assert first == again == built
    with pytest.raises(UsageError, match="other tasks"):
        play_trials(RandomAgent(), tasks[:1], 5, 1, 1, 0, LENGTH, envs=envs)
    envs.close()


def test_start_trials_false_keeps_the_agents_state(tasks):
    whole = list(play_trials(RandomAgent(), tasks, 0, 7, 2, 0, LENGTH))
    envs = make_trial_envs(tasks, LENGTH, seed=0)
    spy = Spy()
    spy.start_trials(len(tasks), 7)
    # Two calls of one episode each continue the primed agent's random stream: the same two episodes.
    parts = [list(play_trials(spy, tasks, 0, 123, 1, 0, LENGTH, envs=envs, start_trials=False))[0] for _ in range(2)]
    envs.close()
    assert spy.starts == [7]
    assert [r["return"] for p in parts for r in p] == [r["return"] for e in whole for r in e]
    restarted = list(play_trials(RandomAgent(), tasks, 0, 123, 2, 0, LENGTH))
    assert [r["return"] for e in restarted for r in e] != [r["return"] for e in whole for r in e]


def test_pipelined_refuses_on_step_in_one_line(tasks):
    with pytest.raises(UsageError) as err:
        play_trials(RandomAgent(), tasks, 0, 0, 1, 0, LENGTH, vector="pipelined", on_step=lambda *a: None)
    assert "pipelined" in str(err.value) and "\n" not in str(err.value)
