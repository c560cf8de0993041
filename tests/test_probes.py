"""Attention probes: statistics on hand-made attention, a model with built-in heads, interventions, replays
through the rollout loop, the probe against the evaluator, CLI."""

import json
import math

import numpy as np
import pytest
import torch

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents, trial_seed
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import get_suite, make_trial_envs
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig
from icl_metarl.probes.attention_statistics import (
    attention_entropy,
    attention_statistics,
    key_mass,
    lag_shares,
    query_mean,
)
from icl_metarl.probes.episodes import Episodes, model_inputs, recorder
from icl_metarl.probes.interventions import ablated_head, remove_episodes, shuffle_rewards, zero_rewards
from icl_metarl.probes.probe import probe, record_attention, teacher_forced_actions
from icl_metarl.study.cli import main

T, K = 6, 3  # steps per episode, episodes


def causal_attention(b, h, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, s, s, generator=g) * 3
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, H, S, S)


def labels(b, k=K, t=T):
    return torch.arange(k).repeat_interleave(t).expand(b, k * t)  # (B, S)


# ----------------------------------------------------------------------------- pure statistics
def test_lag_shares_sum_to_one_and_match_a_loop():
    attn = causal_attention(2, 3, K * T)
    ep = labels(2)
    shares = lag_shares(attn, ep, ep, n_lags=K)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, K * T), atol=1e-6)
    assert torch.allclose(shares.sum(-1), torch.ones(2, 3, K * T), atol=1e-6)
    # second way: loop over queries and keys
    slow = torch.zeros_like(shares)
    for i in range(K * T):
        for j in range(K * T):
            lag = int(ep[0, i] - ep[0, j])
            if lag >= 0:
                slow[:, :, i, lag] += attn[:, :, i, j]
    assert torch.allclose(shares, slow, atol=1e-6)


def test_lag_shares_pool_lags_beyond_the_last():
    attn = causal_attention(1, 1, K * T)
    ep = labels(1)
    two = lag_shares(attn, ep, ep, n_lags=2)
    three = lag_shares(attn, ep, ep, n_lags=3)
    assert torch.allclose(two[..., 1], three[..., 1] + three[..., 2], atol=1e-6)


def test_entropy_mass_and_query_mean_against_formulas():
    s = 5
    attn = torch.zeros(1, 1, s, s)
    for i in range(s):
        attn[0, 0, i, : i + 1] = 1.0 / (i + 1)  # uniform causal rows
    assert torch.allclose(attention_entropy(attn)[0, 0], torch.log(torch.arange(1, s + 1).float()), atol=1e-6)
    mask = torch.tensor([[True, False, False, True, False]])
    expected = torch.tensor([1 / (i + 1) * (1 + (i >= 3)) for i in range(s)])
    assert torch.allclose(key_mass(attn, mask)[0, 0], expected, atol=1e-6)
    q = torch.tensor([[False, True, False, True, True]])
    x = torch.arange(5.0).reshape(1, 1, 5)
    assert query_mean(x, q).item() == pytest.approx((1 + 3 + 4) / 3)


def test_statistics_on_hand_made_attention():
    """Each query row puts its mass on one chosen kind of key; the statistics find exactly that."""
    s = K * T
    ep = labels(1)
    start = (torch.arange(s) % T == 0)[None]
    reward = torch.zeros(1, s)
    reward[0, [2, 9]] = 5.0  # one high-reward token in each earlier episode
    success = torch.zeros(1, s)
    success[0, 9] = 1.0
    last = ep == K - 1
    attn = torch.zeros(1, 2, s, s)
    for i in range(s):
        prev = [j for j in range(s) if ep[0, j] == ep[0, i] - 1]
        attn[0, 0, i, prev or [i]] = 1.0 / len(prev or [i])  # head 0: previous episode, uniformly
        attn[0, 1, i, 9 if i >= 9 else 0] = 1.0  # head 1: the success/high-reward token at step 9
    st = attention_statistics(attn, ep, reward, success, start, last, n_lags=K, high_reward_quantile=0.5)
    assert torch.allclose(st["episode_share"][0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(st["episode_share"][0, 1], torch.tensor([0.0, 1.0, 0.0]))
    assert st["episode_share"][0].sum(-1).allclose(torch.ones(2))
    assert st["earlier_episodes_share"][0].tolist() == [1.0, 1.0]
    # head 0 spreads over T tokens of episode 1, one of them high-reward (2 of 12 earlier tokens are)
    assert st["high_reward_share"][0, 0].item() == pytest.approx(1 / T)
    assert st["high_reward_tokens"][0, 0].item() == pytest.approx(2 / (2 * T))
    assert st["high_reward_share"][0, 1].item() == pytest.approx(1.0)
    assert st["success_share"][0, 1].item() == pytest.approx(1.0)
    assert st["success_tokens"][0, 1].item() == pytest.approx(1 / (2 * T))
    assert st["start_share"][0, 0].item() == pytest.approx(1 / T)  # episode 1's start among its T tokens
    assert st["entropy"][0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert st["entropy"][0, 0].item() == pytest.approx(math.log(T), abs=1e-6)


def test_statistics_undefined_without_such_tokens():
    s = K * T
    ep = labels(1)
    attn = causal_attention(1, 2, s)
    zeros = torch.zeros(1, s)
    st = attention_statistics(attn, ep, zeros, zeros, zeros.bool(), ep == K - 1, n_lags=K)
    assert torch.isnan(st["high_reward_share"]).all() and torch.isnan(st["success_share"]).all()


# ------------------------------------------------------------------------ model with known heads
def built_model(t=T, k=K):
    """Layer 0: head 0 attends to the previous episode, head 1 to episode starts, head 2 to high rewards."""
    c = ICLPolicyConfig(d_model=16, n_layer=2, n_head=4, max_episode_length=t, max_context_episodes=k)
    m = ICLPolicy(c)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)
        d, hs, beta = c.d_model, c.d_model // c.n_head, 20.0
        for pos in range(c.max_positions):
            m.pos_emb.weight[pos, pos // t] = 1.0  # dims 0..k-1: one-hot episode index
        m.token_in.weight[k, c.obs_dim + c.act_dim + 1] = 1.0  # dim k: episode-start flag
        m.token_in.weight[k + 1, c.obs_dim + c.act_dim] = 1.0 / c.reward_scale  # dim k+1: previous reward
        qkv = m.blocks[0].attn.qkv
        for e in range(k - 1):  # head 0: query of episode e+1 matches keys of episode e
            qkv.weight[0 * hs + e, e + 1] = beta
            qkv.weight[d + 0 * hs + e, e] = 1.0
        qkv.bias[1 * hs] = beta  # head 1: constant query, key = start flag
        qkv.weight[d + 1 * hs, k] = 1.0
        qkv.bias[2 * hs] = beta  # head 2: constant query, key = previous reward
        qkv.weight[d + 2 * hs, k + 1] = 1.0
        m.head.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    return m.eval()


def synthetic_episodes(b=2, k=K, t=T, seed=0):
    rng = np.random.default_rng(seed)
    rewards = np.zeros((b, k, t), np.float32)
    rewards[:, : k - 1, t // 2] = 1.0  # one rewarding step in each earlier episode
    success = (rewards > 0).astype(np.float32)
    return Episodes(rng.normal(size=(b, k, t, 39)).astype(np.float32),
                    rng.uniform(-1, 1, (b, k, t, 4)).astype(np.float32), rewards, success)


def test_probe_reports_the_heads_that_were_built():
    m = built_model()
    stats, full = record_attention(m, synthetic_episodes(), high_reward_quantile=0.9)
    assert full.shape == (2, 4, K * T, K * T)
    assert np.allclose(full.sum(-1), 1.0, atol=1e-5)  # attention rows sum to 1
    assert np.allclose(stats["episode_share"].sum(-1), 1.0, atol=1e-5)  # per-episode shares too
    prev = stats["episode_share"][:, 0, :, 1]  # (B, H): layer 0, lag 1
    assert (prev[:, 0] > 0.95).all(), prev
    assert (stats["start_share"][:, 0, 1] > 0.95).all()
    assert (stats["high_reward_share"][:, 0, 2] > 0.95).all()
    assert (stats["high_reward_share"][:, 0, 2] / stats["high_reward_tokens"][:, 0, 2] > 5).all()
    # head 0 spreads over the previous episode's T-2 plain steps (LayerNorm shrinks the episode code of
    # the start and rewarding tokens), head 1 over the K starts, head 2 over the two rewarding steps;
    # head 3 (all zero) is uniform
    assert np.allclose(stats["entropy"][:, 0, :3], np.log([T - 2, K, 2]), atol=0.05)
    assert (stats["entropy_normalised"][:, 0, 3] > 0.99).all()


def test_ablated_head_equals_zeroing_the_heads_output_and_reaches_the_decode_path():
    m = ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=2, n_head=4, max_episode_length=T, max_context_episodes=K))
    torch.nn.init.normal_(m.blocks[1].attn.proj.weight)
    before = m.blocks[1].attn.proj.weight.clone()
    inputs = model_inputs(synthetic_episodes(b=1))
    with torch.no_grad(), ablated_head(m, 1, 2):
        ablated = m(**inputs).action
        cache = m.new_cache(1)
        token = {n: v[:, 0] for n, v in inputs.items()}
        decoded, _ = m.decode_step(token["obs"], token["prev_actions"], token["prev_rewards"], True, 0, cache)
    plain = m(**inputs).action
    assert torch.equal(m.blocks[1].attn.proj.weight, before)  # restored
    assert torch.allclose(torch.tanh(decoded), ablated[:, 0], atol=1e-6)  # the agent's one-token path too

    def zero_head_output(_module, args):  # second way: the head's slice of the projection's input zeroed
        y = args[0].clone()
        y[..., 2 * 4:3 * 4] = 0.0
        return (y,)

    handle = m.blocks[1].attn.proj.register_forward_pre_hook(zero_head_output)
    with torch.no_grad():
        hooked = m(**inputs).action
    handle.remove()
    assert torch.allclose(ablated, hooked, atol=1e-6)
    assert not torch.allclose(ablated, plain, atol=1e-4)
    with pytest.raises(UsageError, match="head"), ablated_head(m, 2, 0):
        pass


def test_interventions():
    ep = synthetic_episodes(b=2, k=2)
    ep.rewards[:] = np.random.default_rng(1).normal(size=ep.rewards.shape)
    sh = shuffle_rewards(ep, np.random.default_rng(0))
    assert np.allclose(np.sort(sh.rewards, axis=2), np.sort(ep.rewards, axis=2))
    assert not np.allclose(sh.rewards, ep.rewards)
    assert np.array_equal(sh.obs, ep.obs)
    assert not zero_rewards(ep, None).rewards.any()
    assert remove_episodes(ep, None).count == 0


# ------------------------------------------------------------------------------- with Meta-World
def play_recorded(agent, envs, tasks, episodes, length, **kw) -> Episodes:
    """Episodes played through the rollout loop on ``envs``, recorded by the probe's ``on_step`` hook."""
    out = Episodes.empty(len(tasks), episodes, length, 39, 4)
    for _ in play_trials(agent, tasks, 0, 0, episodes, 0, length, on_step=recorder(out), envs=envs, **kw):
        pass
    return out


def test_primed_replay_reproduces_the_episode_and_teacher_forcing_matches():
    torch.manual_seed(0)
    m = ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=1, n_head=2, max_episode_length=10, max_context_episodes=3)).eval()
    tasks = get_suite("ML1:reach-v3").tasks("test")[:2]
    envs = make_trial_envs(tasks, 10, 0)
    agent = InContextAgent(m)  # deterministic head, no exploration: the recorded actions are the model's
    played = play_recorded(agent, envs, tasks, 2, 10)
    first, second = played.take(slice(0, 1)), played.take(slice(1, 2))
    agent.start_trials(2, 0)
    agent.prime(first.obs, first.actions, first.rewards, episode_index=1)
    again = play_recorded(agent, envs, tasks, 1, 10, start_trials=False)
    envs.close()
    assert np.allclose(second.actions, again.actions, atol=1e-5)
    assert np.allclose(second.obs, again.obs, atol=1e-5)
    assert np.allclose(teacher_forced_actions(m, first, second), second.actions[:, 0], atol=1e-5)


def test_probe_plays_what_the_evaluator_plays(tmp_path):
    """An exploring checkpoint: the probe's per-episode success and return are the evaluator's records."""
    torch.manual_seed(0)
    ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=1, n_head=2, max_episode_length=40, max_context_episodes=3,
                              explore_episodes=1, explore_scale=0.3)).save_pretrained(tmp_path / "ckpt")
    r = probe(tmp_path / "ckpt", "ML1:reach-v3", trials=3, episodes=3, episode_length=40, seed=1,
              conditions=("remove_episodes",), ablate_heads=False)
    results = evaluate(load_agents([str(tmp_path / "ckpt")]),
                       EvalConfig(suite="ML1:reach-v3", split="test", adaptation_episodes=3, evaluation_episodes=0,
                                  episode_length=40, seeds=(1,), num_tasks=3, batch_size=3, progress=False))
    assert not results["failures"]
    success, returns = np.zeros((3, 3)), np.zeros((3, 3))
    for rec in results["records"]:
        success[rec["task"], rec["episode"]] = rec["success"]
        returns[rec["task"], rec["episode"]] = rec["return"]
    assert np.array_equal(r.baseline["success_by_trial"], success)
    assert np.array_equal(r.baseline["return_by_trial"], returns)
    assert results["trials"][0]["agent_seed"] == trial_seed(1, 0)


def test_probe_end_to_end_on_reach_finds_the_built_head(tmp_path):
    m = built_model(t=8, k=3)
    r = probe(m, "ML1:reach-v3", trials=2, episode_length=8)
    assert r.attention["previous_episode_share"][0, 0] > 0.95
    assert r.attention["start_share"][0, 1] > 0.95
    # reach's dense rewards rise smoothly, so the reward head spreads over the near-top steps: enriched,
    # against exactly 1 for the uniform head 3
    enrich = r.attention["high_reward_enrichment"]
    assert enrich[0, 2] > 1.3 and enrich[0, 3] == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(r.attention["episode_share"].sum(-1), 1.0, atol=1e-5)
    # the built model ignores its inputs' content: its actions are the head's bias whatever the context
    for name in ("shuffle_rewards", "zero_rewards", "remove_episodes"):
        assert r.causal[name]["action_change"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert r.ablation["success_change"]["mean"].shape == (2, 4)
    paths = r.save(tmp_path / "out")
    names = {p.name for p in paths}
    assert {"metrics.json", "probe.md", "attention_layer_head.png", "ablation_layer_head.png",
            "attention_map_L0H0.png"} <= names
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["attention"]["previous_episode_share"][0][0] > 0.95
    assert "layer 0 head 0" in (tmp_path / "out" / "probe.md").read_text()


def test_cli_probe_and_bad_input(tmp_path, capsys):
    torch.manual_seed(0)
    ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=1, n_head=2, max_episode_length=8, max_context_episodes=2)
              ).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "probe"
    rc = main(["probe", str(tmp_path / "ckpt"), "--suite", "ML1:reach-v3", "--out", str(out), "--trials", "1",
               "--episode-length", "8", "--conditions", "zero_rewards", "--heads", "0.1"])
    assert rc == 0
    assert (out / "metrics.json").is_file() and (out / "attention_map_L0H1.png").is_file()
    assert main(["probe", str(tmp_path / "ckpt"), "--out", str(out), "--conditions", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["probe", str(tmp_path / "ckpt"), "--out", str(out), "--episodes", "1"]) == 2
    assert main(["probe", str(tmp_path / "ckpt"), "--out", str(out), "--heads", "5.0"]) == 2
    assert main(["probe", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_probe_plays_the_evaluators_500_step_episodes_by_default():
    """A model holding 167 decisions at k = 3 plays 500 simulator steps (167 x 3 = 501 would run past
    Meta-World's episode end and shift every later episode's boundary); shorter models play what they hold."""
    from icl_metarl.probes.config import ProbeConfig
    from icl_metarl.probes.probe import check_config

    k3 = ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=1, n_head=2, max_episode_length=167, max_context_episodes=3,
                                   action_repeat=3))
    assert check_config(ProbeConfig(suite="ML10"), k3).episode_length == 500
    k1 = ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=1, n_head=2, max_episode_length=40, max_context_episodes=3))
    assert check_config(ProbeConfig(suite="ML10"), k1).episode_length == 40


def test_probe_spreads_its_trials_over_the_environments_as_the_evaluator_does():
    """ML10's test split lists 50 drawer-open tasks first; 10 trials are 2 per environment, the evaluator's
    --tasks-per-env 2 in its order, and 7 trials take the environments in turn."""
    from icl_metarl.harness.evaluation import first_per_env
    from icl_metarl.probes.config import ProbeConfig
    from icl_metarl.probes.probe import probe_tasks

    tasks = get_suite("ML10").tasks("test", 0)
    envs = list(dict.fromkeys(t.env_name for t in tasks))
    assert probe_tasks(tasks, ProbeConfig(suite="ML10", trials=10)) == first_per_env(tasks, 2)
    seven = probe_tasks(tasks, ProbeConfig(suite="ML10", trials=7))
    assert [sum(t.env_name == e for t in seven) for e in envs] == [2, 2, 1, 1, 1]
    assert seven == [t for t in first_per_env(tasks, 2) if t in seven]  # the split's order
    door = probe_tasks(tasks, ProbeConfig(suite="ML10", trials=3, env="door-close-v3"))
    assert door == [t for t in tasks if t.env_name == "door-close-v3"][:3]
    with pytest.raises(UsageError, match="door-open-v3.*door-close-v3"):
        probe_tasks(tasks, ProbeConfig(suite="ML10", env="door-open-v3"))
    with pytest.raises(UsageError, match="trials=51"):
        probe_tasks(tasks, ProbeConfig(suite="ML10", trials=51, env="door-close-v3"))


def test_probe_report_gives_success_per_environment():
    from icl_metarl.probes.report import _success_by_environment

    b = {"environment_by_trial": ["a-v3", "b-v3", "a-v3"], "success_by_trial": [[0, 1], [1, 1], [1, 0]]}
    assert _success_by_environment(b) == ["- a-v3 (2 trials): 0.50, 0.50", "- b-v3 (1 trials): 1.00, 1.00"]
    assert _success_by_environment({**b, "environment_by_trial": ["a-v3"] * 3}) == []
