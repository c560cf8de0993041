"""The decision interval (action repeat): an agent acts every k-th simulator step, its action held.

Checked against k = 1 with the action held by hand, against Meta-World's own evaluation loop, and at
the evaluator's edge (bad values, a checkpoint asked another interval).
"""

import numpy as np
import pytest

from icl_metarl.harness.baselines import make_baseline
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalAgent, EvalConfig, agent_action_repeat, evaluate, trial_seed
from icl_metarl.harness.mw_adapter import evaluate_with_metaworld
from icl_metarl.harness.suites import TrialEnv, decisions_per_episode, get_suite, make_trial_envs

TASK = get_suite("ML1:reach-v3").tasks("train", 0)[3]


def test_decisions_per_episode_is_the_ceiling():
    assert [decisions_per_episode(500, k) for k in (1, 2, 3, 4, 5)] == [500, 250, 167, 125, 100]
    assert decisions_per_episode(10, 20) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_intervals_are_one_line_errors(bad):
    with pytest.raises(UsageError, match="action repeat"):
        make_trial_envs([TASK], 10, action_repeat=bad)
    with pytest.raises(UsageError, match="action repeat"):
        EvalConfig(action_repeat=bad).check()


def test_a_held_action_equals_k_plain_steps():
    """Held for k steps: the summed reward, the last observation and the step count of k = 1 by hand."""
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (8, 4)).astype(np.float32)
    plain, held = TrialEnv(TASK, 20, seed=5), TrialEnv(TASK, 20, seed=5, action_repeat=3)
    plain.reset(), held.reset()
    for i, a in enumerate(actions[:7]):  # 7 decisions: 3 x 6 + 2 (the last holds the 2 steps left)
        obs, reward, _, truncated, info = held.step(a)
        rewards = []
        for _ in range(min(3, 20 - 3 * i)):
            p_obs, r, _, p_trunc, _ = plain.step(a)
            rewards.append(r)
        np.testing.assert_array_equal(obs, p_obs)
        assert reward == pytest.approx(sum(rewards), rel=1e-12)
        assert truncated == p_trunc == (i == 6)


def test_success_counts_at_any_simulator_step_and_its_step_is_the_simulator_step():
    """The oracle at k = 1 and k = 4 on the same tasks: both succeed, first success reported in simulator
    steps (within k - 1 of each other, since the held action changes the path only slightly)."""
    cfg = dict(suite="ML1:reach-v3", split="train", num_tasks=3, adaptation_episodes=0, evaluation_episodes=1,
               episode_length=150, seeds=(0,), progress=False)
    one = evaluate([EvalAgent("oracle", make_baseline("oracle"))], EvalConfig(**cfg))
    four = evaluate([EvalAgent("oracle", make_baseline("oracle"))], EvalConfig(**cfg, action_repeat=4))
    for a, b in zip(one["records"], four["records"]):
        assert a["success"] and b["success"]
        assert abs(a["steps_to_success"] - b["steps_to_success"]) <= 12
    assert four["agents"]["oracle"]["action_repeat"] == 4 and one["agents"]["oracle"]["action_repeat"] == 1


def test_metaworld_own_loop_agrees_at_an_interval():
    """The random agent at k = 3 through our evaluator and through Meta-World's evaluation (the adapter
    holds each action for 3 steps): the same actions, so the same returns to the last digit."""
    cfg = EvalConfig(suite="ML1:reach-v3", num_tasks=2, adaptation_episodes=1, evaluation_episodes=1,
                     episode_length=60, seeds=(0,), progress=False, batch_size=1, action_repeat=3)
    res = evaluate([EvalAgent("random", make_baseline("random"))], cfg)
    ours = [np.mean([r["return"] for r in res["records"] if r["task"] == j and r["phase"] == "evaluation"])
            for j in range(2)]
    agent = make_baseline("random")
    agent.action_repeat = 3  # the adapter reads the agent's interval, as it reads a checkpoint's
    mw = evaluate_with_metaworld(agent, cfg.tasks(), [trial_seed(0, j) for j in range(2)], 1, 1, 60)
    assert [c["return"] for c in mw["calls"]] == pytest.approx(ours, rel=1e-12)
    plain = evaluate_with_metaworld(make_baseline("random"), cfg.tasks(), [trial_seed(0, j) for j in range(2)], 1, 1, 60)
    assert [c["return"] for c in plain["calls"]] != pytest.approx(ours, rel=1e-6)  # k = 1 differs: the test can fail


def test_a_checkpoint_is_played_at_its_own_interval_and_refused_another():
    agent = make_baseline("random")
    assert agent_action_repeat(agent, None) == 1 and agent_action_repeat(agent, 3) == 3
    agent.action_repeat = 4
    agent.checkpoint = "runs/x"
    assert agent_action_repeat(agent, None) == 4 and agent_action_repeat(agent, 4) == 4
    with pytest.raises(UsageError, match="runs/x was trained to act every 4"):
        agent_action_repeat(agent, 2)
