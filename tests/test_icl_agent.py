"""Tests for icl_metarl.incontext.agent: cached rollout == full forward over the same window, window
re-encoding, wiping, seeding, priming with a given context, errors, describe."""

import json
import warnings

import numpy as np
import pytest
import torch
from einops import rearrange

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import load_agents
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig

B = 3
LENGTHS = [5, 7, 4, 6, 7, 3]  # episode lengths (lockstep across trials, varying across episodes)


def tiny(**kw) -> ICLPolicy:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=2, n_head=4, max_episode_length=8, max_context_episodes=3)
    cfg.update(kw)
    return ICLPolicy(ICLPolicyConfig(**cfg)).eval()


def play(agent, lengths=LENGTHS, seed=0):
    """Drive the agent through one batch of trials with random observations and rewards.

    Returns per episode the (obs, actions, rewards) arrays, each (B, T, ...).
    """
    rng = np.random.default_rng(seed)
    agent.start_trials(B, seed=seed)
    episodes = []
    for t_len in lengths:
        obs, acts, rews = [], [], []
        for _ in range(t_len):
            o = rng.normal(size=(B, 39))
            a = agent.act(o)
            r = rng.uniform(0, 10, size=B)
            agent.observe(r, np.zeros(B))
            obs.append(o), acts.append(a), rews.append(r)
        agent.end_episode()
        episodes.append(tuple(np.stack(x, 1) for x in (obs, acts, rews)))
    return episodes


def full_forward_actions(model, episodes):
    """The deterministic actions of one full forward over whole episodes, built independently of the agent."""
    obs = torch.as_tensor(np.concatenate([e[0] for e in episodes], 1), dtype=torch.float32)
    prev_a, prev_r, start, step = [], [], [], []
    for o, a, r in episodes:
        t = o.shape[1]
        prev_a.append(np.concatenate([np.zeros((B, 1, 4)), a[:, :-1]], 1))
        prev_r.append(np.concatenate([np.zeros((B, 1)), r[:, :-1]], 1))
        start.append(np.arange(t) == 0)
        step.append(np.arange(t))
    f = lambda xs: torch.as_tensor(np.concatenate(xs, -1 if xs[0].ndim == 1 else 1))
    start = f(start).expand(B, -1)
    step = f(step).expand(B, -1)
    with torch.no_grad():
        out = model(obs, f(prev_a).float(), f(prev_r).float(), start, step)
    return out.action.numpy()


@pytest.mark.parametrize("use_cache", [True, False])
def test_rollout_equals_full_forward_over_the_same_window(use_cache):
    model = tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        episodes = play(InContextAgent(model, use_cache=use_cache))
    window_msgs = [w for w in caught if "oldest episode is dropped" in str(w.message)]
    assert len(window_msgs) == 1  # 6 episodes > 3: re-encoded 3 times, said once
    m = model.config.max_context_episodes
    worst = 0.0
    for k in range(len(episodes)):
        window = episodes[max(0, k - m + 1) : k + 1]
        expected = full_forward_actions(model, window)[:, -LENGTHS[k] :]
        worst = max(worst, np.abs(expected - episodes[k][1]).max())
    assert worst <= 1e-4, worst
    # and the window mattered: the same last episode without its context acts differently
    alone = full_forward_actions(model, episodes[-1:])
    assert np.abs(alone - episodes[-1][1]).max() > 1e-3


def test_wipe_context_each_episode_sees_only_the_current_episode():
    model = tiny()
    episodes = play(InContextAgent(model, wipe_context_each_episode=True))
    for e in episodes:
        assert np.abs(full_forward_actions(model, [e]) - e[1]).max() <= 1e-4
    assert InContextAgent(model, wipe_context_each_episode=True).name == "icl-wiped"


def test_start_trials_forgets_the_previous_trials():
    agent = InContextAgent(tiny())
    first = play(agent, seed=3)
    play(agent, seed=4)  # other trials in between
    again = play(agent, seed=3)
    for a, b in zip(first, again):
        assert np.array_equal(a[1], b[1])


def test_stochastic_actions_are_seeded():
    model = tiny(action_head="tanh_gaussian")
    a = play(InContextAgent(model, deterministic=False), lengths=[4, 4], seed=1)
    b = play(InContextAgent(model, deterministic=False), lengths=[4, 4], seed=1)
    c = play(InContextAgent(model, deterministic=False), lengths=[4, 4], seed=2)
    d = play(InContextAgent(model, deterministic=True), lengths=[4, 4], seed=1)
    assert np.array_equal(a[1][1], b[1][1])
    assert not np.allclose(a[0][1], c[0][1]) and not np.allclose(a[0][1], d[0][1])
    assert np.abs(a[0][1]).max() <= 1.0
    with pytest.raises(UsageError, match="tanh_gaussian"):
        InContextAgent(tiny(), deterministic=False)


def test_protocol_errors():
    agent = InContextAgent(tiny())
    with pytest.raises(UsageError, match="start_trials"):
        agent.act(np.zeros((B, 39)))
    agent.start_trials(B, seed=0)
    with pytest.raises(UsageError, match="shape"):
        agent.act(np.zeros((B + 1, 39)))
    agent.act(np.zeros((B, 39)))
    with pytest.raises(UsageError, match="observe"):
        agent.act(np.zeros((B, 39)))
    agent.start_trials(B, seed=0)
    for _ in range(8):
        agent.act(np.zeros((B, 39)))
        agent.observe(np.zeros(B), np.zeros(B))
    with pytest.raises(UsageError, match="max_episode_length 8"):
        agent.act(np.zeros((B, 39)))
    for bad in (0, 1.5):
        with pytest.raises(UsageError, match=f"cpu_threads must be a positive integer or None, got {bad}"):
            InContextAgent(tiny(), cpu_threads=bad)


def test_from_pretrained_and_describe(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    agent = InContextAgent.from_pretrained(tmp_path)
    assert "training" not in agent.describe()
    (tmp_path / "training.json").write_text(json.dumps({"task_pool": {"suite": "ML1:reach-v3", "tasks": 400}}))
    d = agent.describe()
    assert d["checkpoint"] == str(tmp_path) and d["training"]["task_pool"]["tasks"] == 400
    assert d["model"]["n_layer"] == 2 and d["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    a = play(agent, lengths=[3])[0][1]
    b = play(InContextAgent(model), lengths=[3])[0][1]
    assert np.array_equal(a, b)
    with pytest.raises(UsageError, match="missing"):
        InContextAgent.from_pretrained(tmp_path / "missing")


def test_runs_real_trial_envs():
    from icl_metarl.harness.suites import get_suite, make_trial_envs

    tasks = get_suite("ML1:reach-v3").tasks("test")[:2]
    envs = make_trial_envs(tasks, episode_length=5)
    agent = InContextAgent(tiny(max_episode_length=5))
    agent.start_trials(2, seed=0)
    for _ in range(2):
        obs, _ = envs.reset()
        for _ in range(5):
            obs, reward, _, _, info = envs.step(agent.act(obs))
            agent.observe(reward, info["success"])
        agent.end_episode()
    envs.close()
    assert agent._length == 10 and agent._cache.length == 10


def test_cpu_threads_are_restored_after_each_step():
    before = torch.get_num_threads()
    agent = InContextAgent(tiny(), cpu_threads=1)
    agent.start_trials(B, seed=0)
    agent.act(np.zeros((B, 39)))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("wipe", [False, True])
def test_exploration_offsets_the_first_episodes_and_the_context_records_the_taken_actions(wipe):
    model = tiny(explore_episodes=2, explore_scale=0.3)  # acting defaults from the config
    agent = InContextAgent(model, wipe_context_each_episode=wipe)
    assert (agent.explore_episodes, agent.explore_scale) == (2, 0.3)
    episodes = play(agent)
    m = 1 if wipe else model.config.max_context_episodes
    offsets = []
    for k, (_, taken, _) in enumerate(episodes):
        # What the model itself says over the recorded window, whose previous actions are the taken ones.
        intended = full_forward_actions(model, episodes[max(0, k - m + 1) : k + 1])[:, -LENGTHS[k]:]
        diff = taken - intended  # (B, T, 4)
        if k < 2:
            free = np.abs(taken) < 1.0 - 1e-6  # not clipped
            per_trial = [d[f.all(1)] for d, f in zip(diff, free)]
            assert all(len(d) >= 2 and np.ptp(d, axis=0).max() < 1e-4 for d in per_trial)  # constant in an episode
            offsets.append(np.stack([d[0] for d in per_trial]))
            assert np.abs(offsets[-1]).max() > 0.05
        else:
            assert np.abs(diff).max() <= 1e-4  # no offset once exploring is over
    assert np.abs(offsets[0] - offsets[1]).max() > 0.05  # a fresh draw every episode
    # Exploration is part of the seeded trial: the same seed gives the same actions.
    again = play(InContextAgent(model, wipe_context_each_episode=wipe))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(episodes, again))
    assert InContextAgent(model, explore_episodes=0).describe()["explore_episodes"] == 0
    with pytest.raises(UsageError, match="explore_episodes"):
        InContextAgent(model, explore_episodes=-1)


def test_step_exploration_perturbs_every_decision_of_the_first_episodes():
    model = tiny()
    agent = InContextAgent(model, explore_episodes=2, explore_scale=0.3, explore_kind="step")
    episodes = play(agent)
    m = model.config.max_context_episodes
    for k, (_, taken, _) in enumerate(episodes):
        intended = full_forward_actions(model, episodes[max(0, k - m + 1) : k + 1])[:, -LENGTHS[k]:]
        # the perturbation is added before the squash: recover it in pre-squash units
        noise = np.arctanh(np.clip(taken, -1 + 1e-6, 1 - 1e-6)) - np.arctanh(np.clip(intended, -1 + 1e-6, 1 - 1e-6))
        if k < 2:
            assert np.abs(np.diff(noise, axis=1)).min(axis=(0, 2)).max() > 1e-3  # a fresh draw at every decision
            assert 0.15 < noise.std() < 0.6  # of the asked scale (0.3), not an offset in action units
        else:
            assert np.abs(taken - intended).max() <= 1e-4  # no perturbation once exploring is over
    again = play(InContextAgent(model, explore_episodes=2, explore_scale=0.3, explore_kind="step"))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(episodes, again))  # part of the seeded trial
    assert InContextAgent(model).describe()["explore_kind"] == "offset"  # the default
    with pytest.raises(UsageError, match="explore_kind 'per-step': allowed offset, step"):
        InContextAgent(model, explore_kind="per-step")


def test_evaluator_overrides_the_checkpoint_exploration(tmp_path):
    tiny(explore_episodes=1, explore_scale=0.2).save_pretrained(tmp_path / "ckpt")
    assert InContextAgent.from_pretrained(tmp_path / "ckpt").explore_episodes == 1  # saved in config.json
    agents = load_agents([str(tmp_path / "ckpt"), "random"], non_adaptive=True,
                         options={"explore_episodes": 3, "explore_scale": 0.5, "deterministic": True})
    icl = [a.agent for a in agents if isinstance(a.agent, InContextAgent)]
    assert len(icl) == 2 and all((a.explore_episodes, a.explore_scale) == (3, 0.5) for a in icl)
    assert [a.label for a in agents] == ["icl", "icl-wiped [non-adaptive]", "random"]
    # an option of another learner (gradient agents' deterministic) is not passed to the in-context one
    assert all(a.deterministic is True for a in icl)  # the deterministic head's own choice, not the option


def test_the_exploration_kind_is_an_acting_default_saved_with_the_checkpoint(tmp_path):
    tiny(explore_episodes=2, explore_scale=0.3, explore_kind="step").save_pretrained(tmp_path / "ckpt")
    agent = InContextAgent.from_pretrained(tmp_path / "ckpt")
    assert agent.explore_kind == "step"  # saved in config.json: relabelling rounds' trials act with it
    explicit = InContextAgent(ICLPolicy.from_pretrained(tmp_path / "ckpt").eval(), explore_kind="step")
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(play(agent), play(explicit)))
    [evaluated] = [a.agent for a in load_agents([str(tmp_path / "ckpt")], options={"explore_kind": "offset"})]
    assert evaluated.explore_kind == "offset"  # the evaluator's option overrides it
    assert InContextAgent(tiny()).explore_kind == "offset"  # a config without the choice: a constant offset
    with pytest.raises(UsageError, match="unknown explore_kind 'per-step'; valid: offset, step"):
        tiny(explore_kind="per-step")


def play_through(agent, obs, rewards):
    """One episode on given observations (B,T,39) and rewards (B,T); the actions taken (B,T,4)."""
    taken = []
    for t in range(obs.shape[1]):
        taken.append(agent.act(obs[:, t]))
        agent.observe(rewards[:, t], np.zeros(B))
    agent.end_episode()
    return np.stack(taken, 1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prime_acts_as_if_the_context_had_been_played(use_cache):
    # sampled actions and exploration in every episode: the generator state matters as much as the context
    model = tiny(action_head="tanh_gaussian", explore_episodes=3, explore_scale=0.3)
    rng = np.random.default_rng(7)
    obs, rewards = rng.normal(size=(3, B, 6, 39)), rng.uniform(0, 10, size=(3, B, 6))
    played = InContextAgent(model, use_cache=use_cache)
    played.start_trials(B, seed=5)
    context = [play_through(played, obs[k], rewards[k]) for k in range(2)]
    state = played.random_state()
    expected = play_through(played, obs[2], rewards[2])

    primed = InContextAgent(model, use_cache=use_cache)
    primed.start_trials(B, seed=99)  # another seed: the state handed over decides the draws
    primed.prime(rearrange(obs[:2], "k b t d -> b k t d"), np.stack(context, 1),
                 rearrange(rewards[:2], "k b t -> b k t"), episode_index=2, random_state=state)
    assert np.abs(play_through(primed, obs[2], rewards[2]) - expected).max() <= 1e-5
    # the context mattered: without it (the episode index still counted) the same draws act otherwise
    empty = InContextAgent(model, use_cache=use_cache)
    empty.start_trials(B, seed=99)
    empty.prime(np.zeros((B, 0, 6, 39)), np.zeros((B, 0, 6, 4)), np.zeros((B, 0, 6)), 2, random_state=state)
    assert np.abs(play_through(empty, obs[2], rewards[2]) - expected).max() > 1e-3
    with pytest.raises(UsageError, match="right after start_trials"):
        empty.prime(np.zeros((B, 0, 6, 39)), np.zeros((B, 0, 6, 4)), np.zeros((B, 0, 6)), 2)


def test_prime_episode_index_decides_exploration():
    model = tiny(explore_episodes=2, explore_scale=0.3)  # deterministic head: exploration is the only draw
    obs = np.random.default_rng(3).normal(size=(B, 5, 39))
    rewards = np.zeros((B, 5))
    none = (np.zeros((B, 0, 5, 39)), np.zeros((B, 0, 5, 4)), np.zeros((B, 0, 5)))
    acted = {}
    for index in (1, 2):
        agent = InContextAgent(model)
        agent.start_trials(B, seed=0)
        agent.prime(*none, episode_index=index)
        acted[index] = play_through(agent, obs, rewards)
    intended = full_forward_actions(model, [(obs, acted[2], rewards)])
    assert np.abs(acted[2] - intended).max() <= 1e-4  # episode 2 of 2 exploring ones: no offset
    assert np.abs(acted[1] - intended).max() > 0.05  # episode 1 still explores, with no context at all
    agent = InContextAgent(model)
    agent.start_trials(B, seed=0)
    with pytest.raises(UsageError, match="episode_index"):
        agent.prime(np.zeros((B, 1, 5, 39)), np.zeros((B, 1, 5, 4)), np.zeros((B, 1, 5)), episode_index=0)
    with pytest.raises(UsageError, match="window"):
        agent.prime(np.zeros((B, 4, 5, 39)), np.zeros((B, 4, 5, 4)), np.zeros((B, 4, 5)), episode_index=4)
