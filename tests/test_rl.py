import numpy as np
import pytest
import torch

from gradient_meta.policy import PolicyConfig, init_policy, log_prob, policy_mean
from gradient_meta.rl import (
    ObsNorm,
    Rollout,
    Sampler,
    advantages,
    batch_moments,
    discounted_returns,
    gae,
    inner_loss,
    make_outer_loss,
    merge_moments,
    to_batch,
)
from icl_metarl.harness.suites import get_suite, make_trial_envs


def test_discounted_returns_match_a_double_loop():
    rew = torch.randn(2, 3, 7)
    got = discounted_returns(rew, 0.9)
    want = torch.zeros_like(rew)
    for t in range(7):
        for k in range(t, 7):
            want[..., t] += 0.9 ** (k - t) * rew[..., k]
    torch.testing.assert_close(got, want)


def test_gae_matches_its_definition():
    rew, values = torch.randn(4, 6), torch.randn(4, 6)
    gamma, lam = 0.95, 0.8
    v_next = torch.cat([values[:, 1:], torch.zeros(4, 1)], 1)
    delta = rew + gamma * v_next - values
    want = torch.stack([sum((gamma * lam) ** (k - t) * delta[:, k] for k in range(t, 6)) for t in range(6)], 1)
    torch.testing.assert_close(gae(rew, values, gamma, lam), want)
    # lambda = 1: GAE is the discounted return minus the baseline.
    torch.testing.assert_close(gae(rew, values, gamma, 1.0), discounted_returns(rew, gamma) - values)


def test_merged_moments_equal_moments_of_the_union():
    a, b = torch.randn(30, 5).double(), 3 + 2 * torch.randn(70, 5).double()
    n, mean, var = merge_moments(*batch_moments(a), *batch_moments(b))
    both = torch.cat([a, b])
    assert float(n) == 100
    torch.testing.assert_close(mean, both.mean(0))
    torch.testing.assert_close(var, both.var(0, unbiased=False))


def test_obs_norm_standardises_and_keeps_constant_slots_at_zero():
    x = torch.cat([3 + 2 * torch.randn(500, 36), torch.zeros(500, 3)], 1).double()  # goal slots: 0
    norm = ObsNorm()
    norm.update(*batch_moments(x))
    z = norm(x.numpy())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z[:, :36].mean(0), torch.zeros(36), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, :36].std(0, unbiased=False), torch.ones(36), atol=1e-3, rtol=0)
    assert torch.all(z[:, 36:] == 0)
    restored = ObsNorm.from_state(norm.state())
    torch.testing.assert_close(restored(x), z)


def _fake_rollout(t=3, e=2, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(t, e, length, 39, generator=g)
    act = torch.randn(t, e, length, 4, generator=g)
    p = init_policy(PolicyConfig(hidden=(8,)), g)
    return p, Rollout(obs, obs.double(), act, log_prob(p, obs, act), torch.rand(t, e, length, generator=g),
                      torch.zeros(t, e))


def test_inner_loss_gradient_is_reinforce_at_the_sampling_policy():
    p, r = _fake_rollout()
    batch = {k: v[0] for k, v in to_batch(r, advantages(r, 0.99, 0.95)).items()}  # one task, (N, ...)
    got = torch.func.grad(inner_loss)(p, batch)
    want = torch.func.grad(lambda q: -(log_prob(q, batch["obs"], batch["act"]) * batch["adv"]).mean())(p)
    for k in p:
        torch.testing.assert_close(got[k], want[k])


def test_outer_loss_clips_the_ratio():
    p, r = _fake_rollout()
    batch = {k: v[0] for k, v in to_batch(r, advantages(r, 0.99, 0.95)).items()}
    loss = make_outer_loss(clip=0.2)
    moved = {k: v + 0.5 for k, v in p.items()}  # far from the sampler: most ratios clipped
    ratio = torch.exp(log_prob(moved, batch["obs"], batch["act"]) - batch["logp"])
    adv = batch["adv"]
    want = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    torch.testing.assert_close(loss(moved, batch), want)
    torch.testing.assert_close(loss(p, batch), -adv.mean())


def test_advantages_are_normalised_per_task():
    _, r = _fake_rollout(length=60)  # more steps than baseline features, so the fit is not exact
    adv = advantages(r, 0.99, 0.95)
    torch.testing.assert_close(adv.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.std(dim=(1, 2)), torch.ones(3), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def reach_tasks():
    return get_suite("ML1:reach-v3").tasks("train")[:4]


def test_switched_tasks_play_like_freshly_built_environments(reach_tasks):
    envs = make_trial_envs(reach_tasks[:2], 20)
    sampler_envs = Sampler(reach_tasks[2:], 20)
    sampler_envs.set_tasks(reach_tasks[:2])
    acts = np.random.default_rng(0).uniform(-1, 1, (20, 2, 4)).astype(np.float32)
    outs = []
    for e in (envs, sampler_envs.envs):
        obs, _ = e.reset()
        traj = [obs]
        for a in acts:
            obs, rew, *_ = e.step(a)
            traj.append(obs)
            traj.append(rew[:, None])
        outs.append(np.concatenate(traj, 1))
    np.testing.assert_allclose(outs[0], outs[1])
    sampler_envs.close()
    envs.close()


def test_sampler_shapes_log_probs_and_per_task_params(reach_tasks):
    p = init_policy(PolicyConfig(hidden=(8,)), torch.Generator().manual_seed(0))
    sampler = Sampler(reach_tasks[:2], 15)
    r = sampler.sample(p, ObsNorm(), 2, torch.Generator().manual_seed(3), per_task=False)
    assert r.obs.shape == (2, 2, 15, 39) and r.act.shape == (2, 2, 15, 4) and r.success.shape == (2, 2)
    torch.testing.assert_close(r.logp, log_prob(p, r.obs, r.act))
    # The same parameters given per task, with the same noise seed, play the same episodes.
    stacked = {k: v.expand(2, *v.shape).clone() for k, v in p.items()}
    r2 = sampler.sample(stacked, ObsNorm(), 2, torch.Generator().manual_seed(3), per_task=True)
    torch.testing.assert_close(r2.act, r.act)
    torch.testing.assert_close(r2.rew, r.rew)
    # Deterministic actions are the mean.
    r3 = sampler.sample(p, ObsNorm(), 1, torch.Generator(), per_task=False, deterministic=True)
    torch.testing.assert_close(r3.act, policy_mean(p, r3.obs))
    sampler.close()
