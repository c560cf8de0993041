"""The compact cross-episode context: earlier episodes by their kept steps, the current one in full.

Compared three ways: the agent's KV-cached steps (cache compacted at each episode end), the agent's full
recomputation of the trial, and the training forward over the whole trial under the compact mask.
"""

import numpy as np
import pytest
import torch

from icl_metarl.harness.errors import UsageError
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.attention import compact_mask, kept_steps
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig
from icl_metarl.incontext.tokens import episode_inputs

L, K, B = 7, 3, 2  # steps per episode, episodes, trials


def tiny(stride=3, **kw) -> ICLPolicy:
    torch.manual_seed(0)
    cfg = ICLPolicyConfig(obs_dim=5, act_dim=2, d_model=16, n_layer=2, n_head=2, max_episode_length=L,
                          max_context_episodes=4, context_stride=stride, **kw)
    return ICLPolicy(cfg).eval()


def play(agent: InContextAgent, obs, rewards) -> np.ndarray:
    """Actions (B, K, L, A) of ``agent`` on given observations (B,K,L,D) and rewards (B,K,L)."""
    agent.start_trials(B, seed=0)
    out = np.zeros((B, K, L, 2), np.float32)
    for e in range(K):
        for t in range(L):
            out[:, e, t] = agent.act(obs[:, e, t])
            agent.observe(rewards[:, e, t], np.zeros(B))
        agent.end_episode()
    return out


def trial(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, K, L, 5)).astype(np.float32), rng.normal(size=(B, K, L)).astype(np.float32)


def training_forward(model, obs, actions, rewards) -> np.ndarray:
    """The training path: one forward over the whole trial, episode index counted from its starts."""
    x = episode_inputs(obs, actions, rewards)
    with torch.no_grad():
        out = model(x["obs"], x["prev_actions"], x["prev_rewards"], x["episode_start"], x["step_in_episode"])
    return out.action.reshape(B, K, L, 2).numpy()


def test_kept_steps_are_every_stride_th_and_the_last():
    assert kept_steps(7, 3) == [2, 5, 6]
    assert kept_steps(6, 3) == [2, 5]
    assert kept_steps(5, 1) == [0, 1, 2, 3, 4]


def test_compact_mask_by_hand():
    # two episodes of 3 steps, stride 2: episode 0 keeps steps 1 and 2 (the last)
    ep = torch.tensor([0, 0, 0, 1, 1, 1])
    step = torch.tensor([0, 1, 2, 0, 1, 2])
    m = compact_mask(ep, step, 2).int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [0, 1, 1, 1, 0, 0],
                 [0, 1, 1, 1, 1, 0],
                 [0, 1, 1, 1, 1, 1]]


def test_cached_acting_equals_recomputation_and_the_training_forward():
    model = tiny()
    obs, rewards = trial()
    cached = play(InContextAgent(model, use_cache=True), obs, rewards)
    recomputed = play(InContextAgent(model, use_cache=False), obs, rewards)
    np.testing.assert_allclose(cached, recomputed, atol=1e-5)
    np.testing.assert_allclose(cached, training_forward(model, obs, cached, rewards), atol=1e-5)


def cache_lengths(model) -> np.ndarray:
    """(K, L) the agent's cache length after each step of a played trial."""
    agent = InContextAgent(model)
    obs, rewards = trial()
    agent.start_trials(B, 0)
    lengths = np.zeros((K, L), int)
    for e in range(K):
        for t in range(L):
            agent.act(obs[:, e, t])
            agent.observe(rewards[:, e, t], np.zeros(B))
            lengths[e, t] = agent._cache.length
        agent.end_episode()
    return lengths


def test_the_cache_holds_kept_steps_of_earlier_episodes_and_the_current_one():
    e, t = np.indices((K, L))
    np.testing.assert_array_equal(cache_lengths(tiny(stride=3)), e * len(kept_steps(L, 3)) + t + 1)


def test_nothing_depends_on_a_later_step():
    model = tiny(stride=3)
    obs, rewards = trial()
    base = play(InContextAgent(model), obs, rewards)
    later = obs.copy()
    later[:, 1, 4] += 5.0  # episode 1, step 4: after everything of episode 0 and steps 0-3 of episode 1
    out = play(InContextAgent(model), later, rewards)
    np.testing.assert_array_equal(out[:, 0], base[:, 0])
    np.testing.assert_array_equal(out[:, 1, :4], base[:, 1, :4])
    assert not np.allclose(out[:, 1, 4], base[:, 1, 4])  # the perturbed step itself moves


def test_a_dropped_step_reaches_later_episodes_only_through_kept_ones():
    """One layer, actions held fixed: a later episode's token reads the kept tokens of earlier episodes,
    whose keys and values at layer 1 are functions of their own token only; a dropped step's observation
    then cannot change a later episode, and a kept step's does."""
    torch.manual_seed(0)
    cfg = ICLPolicyConfig(obs_dim=5, act_dim=2, d_model=16, n_layer=1, n_head=2, max_episode_length=L,
                          max_context_episodes=4, context_stride=3)
    model = ICLPolicy(cfg).eval()
    obs, rewards = trial()
    actions = np.random.default_rng(2).uniform(-1, 1, (B, K, L, 2)).astype(np.float32)
    base = training_forward(model, obs, actions, rewards)
    dropped = obs.copy()
    dropped[:, 0, 0] += 5.0  # step 0 of episode 0 is not kept
    out = training_forward(model, dropped, actions, rewards)
    assert not np.allclose(out[:, 0, 1:], base[:, 0, 1:])  # its own episode reads it
    np.testing.assert_allclose(out[:, 1:], base[:, 1:], atol=1e-6)  # later episodes never do
    kept = obs.copy()
    kept[:, 0, 2] += 5.0  # step 2 is kept
    assert not np.allclose(training_forward(model, kept, actions, rewards)[:, 1:], base[:, 1:])


def assert_primed_equals_played(model) -> np.ndarray:
    """A trial's first two episodes primed into a fresh agent: its third episode acts as the played one did.
    Returns the played trial's actions."""
    obs, rewards = trial()
    played = play(InContextAgent(model), obs, rewards)
    agent = InContextAgent(model)
    agent.start_trials(B, 0)
    agent.prime(obs[:, :2], played[:, :2], rewards[:, :2], episode_index=2)
    for t in range(L):
        np.testing.assert_allclose(agent.act(obs[:, 2, t]), played[:, 2, t], atol=1e-5)
        agent.observe(rewards[:, 2, t], np.zeros(B))
    return played


def test_primed_context_equals_played_one():
    assert_primed_equals_played(tiny())


def test_wiped_variant_reads_only_its_episode():
    model = tiny()
    obs, rewards = trial()
    wiped = play(InContextAgent(model, wipe_context_each_episode=True), obs, rewards)
    for e in range(K):  # each episode alone, as the first of a trial
        alone = InContextAgent(model)
        alone.start_trials(B, 0)
        for t in range(L):
            np.testing.assert_allclose(alone.act(obs[:, e, t]), wiped[:, e, t], atol=1e-5)
            alone.observe(rewards[:, e, t], np.zeros(B))


def test_a_trial_longer_than_the_context_is_refused():
    model = tiny()
    agent = InContextAgent(model)
    agent.start_trials(1, 0)
    with pytest.raises(UsageError, match="max_context_episodes=4"):
        for _ in range(5):
            for _ in range(2):
                agent.act(np.zeros((1, 5), np.float32))
                agent.observe(np.zeros(1), np.zeros(1))
            agent.end_episode()


@pytest.mark.parametrize("field,value", [("context_stride", -1), ("action_repeat", 0), ("action_repeat", 1.5)])
def test_bad_settings_are_one_line_errors(field, value):
    with pytest.raises(UsageError, match=field):
        ICLPolicyConfig(**{field: value})


def test_save_and_load_keep_the_compact_settings(tmp_path):
    model = tiny(action_repeat=4)
    model.save_pretrained(tmp_path)
    back = ICLPolicy.from_pretrained(tmp_path)
    assert (back.config.context_stride, back.config.action_repeat) == (3, 4)
    assert InContextAgent(back).action_repeat == 4
    obs, rewards = trial()
    np.testing.assert_array_equal(play(InContextAgent(back), obs, rewards), play(InContextAgent(model), obs, rewards))


def test_a_checkpoint_asked_another_context_form_is_refused(tmp_path):
    tiny().save_pretrained(tmp_path)
    assert InContextAgent.from_pretrained(tmp_path, context_stride=3).model.config.context_stride == 3
    with pytest.raises(UsageError, match="--context-stride 0: .* compact context of stride 3"):
        InContextAgent.from_pretrained(tmp_path, context_stride=0)


NORM = dict(obs_mean=[0.5, -1.0, 0.0, 2.0, 0.1], obs_std=[0.1, 2.0, 1.0, 0.05, 0.3])


def test_normalised_observations_act_the_same_cached_recomputed_trained_and_reloaded(tmp_path):
    model, raw = tiny(**NORM), tiny()  # same weights (seeded), one reads standardised observations
    obs, rewards = trial()
    cached = play(InContextAgent(model, use_cache=True), obs, rewards)
    np.testing.assert_allclose(cached, play(InContextAgent(model, use_cache=False), obs, rewards), atol=1e-5)
    np.testing.assert_allclose(cached, training_forward(model, obs, cached, rewards), atol=1e-5)
    # the raw model given the standardised observations by hand acts the same: the statistics are applied
    standard = (obs - np.float32(NORM["obs_mean"])) / np.float32(NORM["obs_std"])
    np.testing.assert_allclose(cached, play(InContextAgent(raw), standard, rewards), atol=1e-5)
    assert np.abs(cached - play(InContextAgent(raw), obs, rewards)).max() > 1e-3
    model.save_pretrained(tmp_path)
    back = ICLPolicy.from_pretrained(tmp_path)
    assert back.config.obs_std == NORM["obs_std"]
    np.testing.assert_array_equal(play(InContextAgent(back), obs, rewards), cached)


@pytest.mark.parametrize("bad", [dict(obs_mean=[0.0] * 5), dict(obs_mean=[0.0] * 4, obs_std=[1.0] * 4),
                                 dict(obs_mean=[0.0] * 5, obs_std=[1.0, 1.0, 0.0, 1.0, 1.0])])
def test_bad_observation_statistics_are_one_line_errors(bad):
    with pytest.raises(UsageError, match="obs_mean and obs_std"):
        ICLPolicyConfig(obs_dim=5, **bad)


@pytest.mark.parametrize("trained", [1, 2])
def test_episodes_beyond_the_trained_ones_share_the_last_trained_embedding(trained):
    """``trained_episodes`` n: episode i reads embedding row min(i, n - 1), in cached acting, recomputation and the
    training forward alike: the same as a model whose rows n.. are copies of row n - 1, and unlike the model that
    reads its own (untrained) rows."""
    model = tiny(trained_episodes=trained)
    copied = tiny()
    with torch.no_grad():
        copied.episode_emb.weight[trained:] = copied.episode_emb.weight[trained - 1]
    obs, rewards = trial()
    cached = play(InContextAgent(model, use_cache=True), obs, rewards)
    np.testing.assert_allclose(cached, play(InContextAgent(model, use_cache=False), obs, rewards), atol=1e-5)
    np.testing.assert_allclose(cached, training_forward(model, obs, cached, rewards), atol=1e-5)
    np.testing.assert_allclose(cached, play(InContextAgent(copied), obs, rewards), atol=1e-5)
    own = play(InContextAgent(tiny()), obs, rewards)
    np.testing.assert_array_equal(own[:, :trained], cached[:, :trained])  # trained indices: as before
    assert not np.allclose(own[:, trained:], cached[:, trained:])


def test_trained_episodes_outside_the_table_is_a_one_line_error():
    for bad in (-1, 5, 1.5):
        with pytest.raises(UsageError, match=r"trained_episodes must be an integer in \[0, max_context_episodes=4\]"):
            tiny(trained_episodes=bad)
    assert tiny().config.embedded_episodes == 4 and tiny(trained_episodes=2).config.embedded_episodes == 2
