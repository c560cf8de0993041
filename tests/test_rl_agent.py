import numpy as np
import pytest
import torch
from torch.func import vmap

from gradient_meta.functional import adapt_tasks
from gradient_meta.meta_rl import MetaRLConfig, meta_train
from gradient_meta.policy import policy_mean
from gradient_meta.rl import GaussianAgent, Rollout, advantages, inner_loss, to_batch
from gradient_meta.rl_agent import GradientRLAgent, RLAgentConfig, load_agent
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
    fixed = load_any(str(run_dir), adaptive=False, options=options)  # an adaptive one samples until it adapts
    obs = np.random.default_rng(0).standard_normal((2, 39))
    fixed.start_trials(2, 0)
    a = fixed.act(obs)
    fixed.start_trials(2, 1)
    np.testing.assert_array_equal(fixed.act(obs), a)  # the mean action ignores the seed


def _record(agent, adaptation, evaluation, seed):
    """Play K + E episodes of 2 trials; the records and, per episode, its (obs, actions) steps and the
    parameters the agent acted with (taken before ``end_episode`` may adapt them)."""
    played, steps = [], []
    orig_act, orig_end = agent.act, agent.end_episode

    def act(obs):
        steps.append((obs, orig_act(obs)))
        return steps[-1][1]

    def end_episode():
        played.append((list(steps), {k: v.clone() for k, v in agent.trial_params.items()}))
        steps.clear()
        orig_end()

    agent.act, agent.end_episode = act, end_episode
    tasks = get_suite("ML1:reach-v3").tasks("test")[:2]
    records = [r for r in play_trials(agent, tasks, 0, seed, adaptation, evaluation, 8)]
    return records, played


def _is_mean(agent, steps, params) -> bool:
    """Every action equals the mean of ``params``, clipped as ``act`` clips, bit for bit."""
    with torch.no_grad():
        return all(np.array_equal(a, vmap(policy_mean)(params, agent.norm(obs)).clamp(-1.0, 1.0).numpy())
                   for obs, a in steps)


def test_deterministic_samples_while_adapting_then_acts_with_the_adapted_mean(run_dir):
    agent = load_agent(run_dir, deterministic=True)
    assert (agent.config.adapt_every, agent.config.max_adaptations) == (1, 1)  # one step, after episode 1
    _, played = _record(agent, 2, 1, seed=0)
    _, other = _record(load_agent(run_dir, deterministic=True), 2, 1, seed=1)
    (first, initial), *after = played
    assert not _is_mean(agent, first, initial)  # the episode the inner step learns from is sampled ...
    assert not np.array_equal(first[0][1], other[0][0][1])  # ... from the seed's noise
    for steps, params in after:  # the rest of K and the evaluation episode: the adapted policy's mean
        assert _is_mean(agent, steps, params)
        assert any(not torch.equal(params[k], initial[k]) for k in params if k != "log_std")
    fixed = load_agent(run_dir, adaptive=False, deterministic=True)  # never adapts: the mean throughout
    _, played = _record(fixed, 2, 1, seed=0)
    assert all(_is_mean(fixed, steps, params) for steps, params in played)


def test_deterministic_adaptation_moves_the_mean_network_as_sampled_adaptation_does(run_dir):
    mean, sampled = load_agent(run_dir, deterministic=True), load_agent(run_dir)
    _record(mean, 1, 0, seed=4)
    _record(sampled, 1, 0, seed=4)
    assert mean.adaptations == 1
    for k, v in mean.params.items():  # the same sampled episode, so the same inner step
        torch.testing.assert_close(mean.trial_params[k], sampled.trial_params[k], rtol=0, atol=0)
        if k != "log_std":  # mean-action episodes only moved log_std (issue 22)
            assert all(not torch.equal(p, v) for p in mean.trial_params[k])


class _AlwaysSampled(GradientRLAgent):
    """The agent's ``act`` before issue 22, with deterministic False: mean + std * noise in every episode."""

    def act(self, obs):
        x = self.norm(obs)
        with torch.no_grad():
            mean = vmap(policy_mean)(self.trial_params, x)
            act = mean + torch.exp(self.trial_params["log_std"]) * torch.randn(mean.shape, generator=self.generator)
        self.steps["obs"].append(x)
        self.steps["act"].append(act)
        return act.clamp(-1.0, 1.0).numpy()


def test_sampled_agent_plays_as_before(run_dir):
    agent = load_agent(run_dir)
    old = _AlwaysSampled(agent.params, agent.norm, agent.config, agent.step_sizes)
    records, played = _record(agent, 2, 1, seed=3)
    want, old_played = _record(old, 2, 1, seed=3)
    assert records == want
    for (steps, params), (old_steps, old_params) in zip(played, old_played, strict=True):
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(steps, old_steps, strict=True))
        assert all(torch.equal(params[k], old_params[k]) for k in params)
    # non-adaptive, it is the meta-training sampler's player, clipped
    fixed = load_agent(run_dir, adaptive=False)
    player = GaussianAgent(fixed.params, fixed.norm, torch.Generator(), per_task=False)
    fixed.start_trials(2, 7), player.start_trials(2, 7)
    for obs in np.random.default_rng(0).normal(size=(3, 2, 39)):
        np.testing.assert_array_equal(fixed.act(obs), np.clip(player.act(obs), -1.0, 1.0))
