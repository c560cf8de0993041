import math

import pytest
import torch
from torch import nn

from gradient_meta.policy import (
    PolicyConfig,
    baseline_features,
    entropy,
    fit_linear_baseline,
    init_policy,
    log_prob,
    policy_mean,
    predict_baseline,
    sample_action,
)
from icl_metarl.harness.errors import UsageError


def _params(seed=0):
    p = init_policy(PolicyConfig(hidden=(8, 5), init_std=0.7), torch.Generator().manual_seed(seed))
    # A non-trivial last layer so the mean is not ~0.
    p["layer2.weight"] = torch.randn_like(p["layer2.weight"])
    return p


def test_mean_matches_nn_module():
    p = _params()
    net = nn.Sequential(nn.Linear(39, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 4))
    with torch.no_grad():
        for i, j in enumerate((0, 2, 4)):
            net[j].weight.copy_(p[f"layer{i}.weight"])
            net[j].bias.copy_(p[f"layer{i}.bias"] + 0.1 * i)
            p[f"layer{i}.bias"] = p[f"layer{i}.bias"] + 0.1 * i
    obs = torch.randn(3, 7, 39)
    torch.testing.assert_close(policy_mean(p, obs), net(obs))


def test_log_prob_and_entropy_match_torch_distributions():
    p = _params()
    obs, act = torch.randn(6, 39), torch.randn(6, 4)
    dist = torch.distributions.Normal(policy_mean(p, obs), torch.exp(p["log_std"]))
    torch.testing.assert_close(log_prob(p, obs, act), dist.log_prob(act).sum(-1))
    torch.testing.assert_close(entropy(p), dist.entropy()[0].sum())


def test_sampled_actions_have_the_policy_std():
    p = _params()
    obs = torch.zeros(20000, 39)
    a = sample_action(p, obs, torch.Generator().manual_seed(1))
    assert torch.allclose(a.std(0), torch.full((4,), 0.7), atol=0.02)
    torch.testing.assert_close(sample_action(p, obs[:3], deterministic=True), policy_mean(p, obs[:3]))


def test_vmap_over_per_task_params_equals_a_loop():
    ps = [_params(s) for s in range(3)]
    stacked = {k: torch.stack([p[k] for p in ps]) for k in ps[0]}
    obs, act = torch.randn(3, 5, 39), torch.randn(3, 5, 4)
    got = torch.func.vmap(log_prob)(stacked, obs, act)
    want = torch.stack([log_prob(p, o, a) for p, o, a in zip(ps, obs, act)])
    torch.testing.assert_close(got, want)


def test_linear_baseline_recovers_a_linear_target():
    g = torch.Generator().manual_seed(0)
    obs, step = torch.randn(200, 5, generator=g), torch.rand(200, generator=g)
    feats = baseline_features(obs, step)
    true_w = torch.randn(feats.shape[1], generator=g)
    w = fit_linear_baseline(feats, feats @ true_w)
    torch.testing.assert_close(predict_baseline(w, feats), feats @ true_w, atol=1e-3, rtol=1e-3)


def test_linear_baseline_survives_constant_features():
    obs = torch.zeros(50, 3)  # like the hidden goal slots: always 0
    feats = baseline_features(obs, torch.linspace(0, 1, 50))
    w = fit_linear_baseline(feats, torch.linspace(0, 1, 50) * 3)
    assert torch.isfinite(w).all()


def test_bad_config_is_a_usage_error():
    with pytest.raises(UsageError, match="hidden"):
        PolicyConfig(hidden=(0,))
    with pytest.raises(UsageError, match="init_std"):
        PolicyConfig(init_std=-1.0)
    assert math.isclose(float(torch.exp(init_policy(PolicyConfig(init_std=0.3))["log_std"][0])), 0.3, rel_tol=1e-6)
