import numpy as np
import pytest
import torch

from gradient_meta.functional import adapt_tasks
from gradient_meta.meta_rl import MetaRLConfig, meta_train
from gradient_meta.rl import Rollout, advantages, inner_loss, to_batch
from gradient_meta.rl_agent import RLAgentConfig, load_agent
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import get_suite


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    meta_train(MetaRLConfig(algo="meta-sgd", iterations=1, meta_batch=2, episode_length=8, hidden=(8,),
                            ppo_epochs=1), out, progress=False)
    return out


def _play(agent, episodes, length=8, n=2):
    tasks = get_suite("ML1:reach-v3").tasks("test")[:n]
    return [r for r in play_trials(agent, tasks, 0, 0, episodes, 0, length)]


def test_adaptation_equals_meta_trainings_inner_step(run_dir):
    agent = load_agent(run_dir)
    assert agent.step_sizes is not None  # Meta-SGD's learned step sizes travel with the checkpoint
    start = {k: v.clone() for k, v in agent.trial_params.items()}
    agent.start_trials(2, 5)
    seen = {"obs": [], "act": [], "rew": []}
    orig_act, orig_obs = agent.act, agent.observe

    def act(obs):
        a = orig_act(obs)
        seen["obs"].append(agent.steps["obs"][-1]), seen["act"].append(agent.steps["act"][-1])
        return a

    agent.act = act
    agent.observe = lambda r, s: (seen["rew"].append(torch.as_tensor(r, dtype=torch.float32)), orig_obs(r, s))
    _play(agent, 1)
    obs, actions, rew = (torch.stack(seen[k], 1)[:, None] for k in ("obs", "act", "rew"))  # (B, 1, L, ...)
    from gradient_meta.policy import log_prob
    r = Rollout(obs, obs.double(), actions, log_prob(agent.params, obs, actions), rew, torch.zeros(2, 1))
    want = adapt_tasks(inner_loss, agent.params, to_batch(r, advantages(r, 0.99, 0.95)), agent.step_sizes, 1)
    for k in want:
        torch.testing.assert_close(agent.trial_params[k], want[k], atol=1e-5, rtol=1e-5)
        assert not torch.equal(agent.trial_params[k][0], start[k][0]) or k == "log_std"


def test_start_trials_forgets_and_non_adaptive_never_steps(run_dir):
    agent = load_agent(run_dir, max_adaptations=2)
    _play(agent, 3)
    assert agent.adaptations == 2
    agent.start_trials(3, 0)
    for k, v in agent.params.items():
        assert torch.equal(agent.trial_params[k], v.expand(3, *v.shape))
    fixed = load_agent(run_dir, adaptive=False)
    _play(fixed, 2)
    for k, v in fixed.params.items():
        assert torch.equal(fixed.trial_params[k], v.expand(2, *v.shape))


def test_deterministic_actions_repeat_and_sampled_ones_follow_the_seed(run_dir):
    a = load_agent(run_dir, adaptive=False, deterministic=True)
    obs = np.random.default_rng(0).normal(size=(2, 39))
    a.start_trials(2, 0)
    x = a.act(obs)
    a.start_trials(2, 9)
    np.testing.assert_array_equal(a.act(obs), x)
    s = load_agent(run_dir, adaptive=False)
    s.start_trials(2, 1)
    y1 = s.act(obs)
    s.start_trials(2, 1)
    y2 = s.act(obs)
    np.testing.assert_array_equal(y1, y2)
    assert np.all(np.abs(y1) <= 1)


def test_bad_checkpoints_are_usage_errors(tmp_path, run_dir):
    with pytest.raises(UsageError, match="config.json"):
        load_agent(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "icl_metarl_policy"}')
    (tmp_path / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    with pytest.raises(UsageError, match="model_type"):
        load_agent(tmp_path)
    with pytest.raises(UsageError, match="adapt_every"):
        RLAgentConfig(adapt_every=0)


def test_evaluate_deterministic_option_reaches_gradient_agents_only(run_dir):
    from icl_metarl.harness.registry import load_agent as load_any

    options = {"deterministic": True, "explore_episodes": 3}  # the second belongs to in-context agents
    mean = load_any(str(run_dir), options=options)
    sampled = load_any(str(run_dir), options={"deterministic": None})
    assert mean.config.deterministic is True and sampled.config.deterministic is False
    obs = np.random.default_rng(0).standard_normal((2, 39))
    mean.start_trials(2, 0)
    a = mean.act(obs)
    mean.start_trials(2, 1)
    np.testing.assert_array_equal(mean.act(obs), a)  # the mean action ignores the seed
