"""Tests for icl_metarl.incontext.model: cache == full forward, causality, kernels agree, files round-trip."""

import json
import math
import warnings

import pytest
import torch

from icl_metarl.harness.errors import UsageError
from icl_metarl.incontext import attention
from icl_metarl.incontext import model as M
from icl_metarl.incontext.loss import action_loss, tanh_gaussian_nll
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig
from icl_metarl.incontext.tokens import shift_previous

EP = 6  # episode length of the hand-made sequences


def tiny(**kw) -> ICLPolicy:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=2, n_head=4, max_episode_length=8, max_context_episodes=4)
    cfg.update(kw)
    return ICLPolicy(ICLPolicyConfig(**cfg)).eval()


def tokens(b=3, episodes=3, seed=1):
    """A batch of random trials of fixed-length episodes, as the model's inputs."""
    g = torch.Generator().manual_seed(seed)
    t = episodes * EP
    step = torch.arange(t) % EP
    batch = {
        "obs": torch.randn(b, t, 39, generator=g),
        "actions": torch.rand(b, t, 4, generator=g) * 2 - 1,
        "rewards": torch.rand(b, t, generator=g) * 10,
        "episode_start": (step == 0).expand(b, t).clone(),
        "step_in_episode": step.expand(b, t).clone(),
    }
    batch["expert_actions"] = torch.rand(b, t, 4, generator=g) * 2 - 1
    batch["prev_actions"], batch["prev_rewards"] = shift_previous(batch["actions"], batch["rewards"], batch["episode_start"])
    return batch


def run(model, x, sl=slice(None), **kw):
    return model(x["obs"][:, sl], x["prev_actions"][:, sl], x["prev_rewards"][:, sl],
                 x["episode_start"][:, sl], x["step_in_episode"][:, sl], **kw)


def test_shift_previous_matches_a_loop():
    x = tokens(b=2, episodes=2)
    pa, pr = x["prev_actions"], x["prev_rewards"]
    for bi in range(2):
        for t in range(2 * EP):
            if t % EP == 0:
                assert pa[bi, t].abs().sum() == 0 and pr[bi, t] == 0
            else:
                assert torch.equal(pa[bi, t], x["actions"][bi, t - 1]) and pr[bi, t] == x["rewards"][bi, t - 1]


@pytest.mark.parametrize("head", ["deterministic", "tanh_gaussian"])
@pytest.mark.parametrize("chunk", [1, 5])
def test_cached_incremental_equals_full_forward(head, chunk):
    model, x = tiny(action_head=head), tokens(episodes=4)
    full = run(model, x)
    cache, pieces = model.new_cache(3), []
    with torch.no_grad():
        for s in range(0, 4 * EP, chunk):  # chunk > 1 exercises the bottom-right causal mask
            pieces.append(run(model, x, slice(s, s + chunk), past_key_values=cache, use_cache=True))
    assert cache.length == 4 * EP
    assert (torch.cat([p.mean for p in pieces], 1) - full.mean).abs().max() <= 1e-4
    if head == "tanh_gaussian":
        assert (torch.cat([p.log_std for p in pieces], 1) - full.log_std).abs().max() <= 1e-4


@pytest.mark.parametrize("head", ["deterministic", "tanh_gaussian"])
def test_decode_step_equals_the_full_forward(head):
    """The rollout's one-token fast path gives the general forward's numbers and fills the same cache,
    with a plan built before the weights changed in place (it holds the live parameters) and without one."""
    model, x = tiny(action_head=head), tokens(episodes=4)
    plan = model.decode_plan()
    with torch.no_grad():  # every norm distinct from the identity, and log_std outside its clamp range
        for name, p in model.named_parameters():
            if "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
        if head == "tanh_gaussian":
            model.head.bias[4:] = torch.tensor([4.0, -8.0, 0.0, 0.0])
    full = run(model, x)
    if head == "tanh_gaussian":
        assert full.log_std[..., 0].eq(M.LOG_STD_RANGE[1]).any() and full.log_std[..., 1].eq(M.LOG_STD_RANGE[0]).any()
    cache, means, stds = model.new_cache(3, capacity=4 * EP), [], []
    with torch.no_grad():
        for s in range(4 * EP):
            mean, log_std = model.decode_step(x["obs"][:, s], x["prev_actions"][:, s], x["prev_rewards"][:, s],
                                              s % EP == 0, s % EP, cache, plan if s % 2 else None)
            means.append(mean), stds.append(log_std)
    assert cache.length == 4 * EP
    assert (torch.stack(means, 1) - full.mean).abs().max() <= 1e-5
    if head == "tanh_gaussian":
        assert (torch.stack(stds, 1) - full.log_std).abs().max() <= 1e-5
    else:
        assert all(s is None for s in stds)
    reference = model.new_cache(3, capacity=4 * EP)
    with torch.no_grad():
        run(model, x, past_key_values=reference, use_cache=True)
    assert torch.allclose(cache.keys, reference.keys, atol=1e-6) and torch.allclose(cache.values, reference.values, atol=1e-6)
    with pytest.raises(UsageError, match="step 8"):
        model.decode_step(x["obs"][:, 0], x["prev_actions"][:, 0], x["prev_rewards"][:, 0], False, 8, model.new_cache(3))
    with pytest.raises(UsageError, match="capacity 24"):
        model.decode_step(x["obs"][:, 0], x["prev_actions"][:, 0], x["prev_rewards"][:, 0], False, 0, cache)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causality(impl):
    model, x = tiny(attn_implementation=impl), tokens()
    before = run(model, x).mean
    k = 8
    y = {n: v.clone() for n, v in x.items()}
    y["obs"][:, k] += 1.0
    y["prev_rewards"][:, k] += 3.0
    after = run(model, y).mean
    assert torch.equal(before[:, :k], after[:, :k])
    assert (before[:, k:] - after[:, k:]).abs().amax(-1).min() > 0  # every later output moved


def test_sdpa_and_eager_agree_and_eager_returns_attention():
    x = tokens(episodes=3)
    sdpa, eager = tiny(attn_implementation="sdpa"), tiny(attn_implementation="eager")
    a = run(sdpa, x).mean
    out = run(eager, x, output_attentions=True)
    assert (a - out.mean).abs().max() <= 1e-5
    assert len(out.attentions) == 2
    w = out.attentions[0]
    t = 3 * EP
    assert w.shape == (3, 4, t, t)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, t), atol=1e-5)
    assert w.triu(1).abs().max() == 0  # nothing attends the future
    # with a cache the weights cover past + new keys
    cache = eager.new_cache(3)
    run(eager, x, slice(0, 10), past_key_values=cache, use_cache=True)
    step = run(eager, x, slice(10, 11), past_key_values=cache, use_cache=True, output_attentions=True)
    assert step.attentions[1].shape == (3, 4, 1, 11)
    assert torch.allclose(step.attentions[1], out.attentions[1][:, :, 10:11, :11], atol=1e-5)


def test_output_attentions_needs_eager():
    with pytest.raises(UsageError, match="eager"):
        run(tiny(), tokens(), output_attentions=True)


def test_flash_falls_back_to_sdpa_with_one_warning(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x = tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flash = tiny(attn_implementation="flash_attention_2")
        tiny(attn_implementation="flash_attention_2")
        out = run(flash, x).mean
    msgs = [str(w.message) for w in caught if "flash_attention_2" in str(w.message)]
    assert len(msgs) == 1 and "sdpa" in msgs[0]
    assert flash.attn_implementation == "sdpa"
    assert torch.equal(out, run(tiny(), x).mean)


def test_tanh_gaussian_nll_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, log_std = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g) * 0.5
    a = torch.tanh(torch.randn(2, 5, 4, generator=g))
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    assert torch.allclose(tanh_gaussian_nll(mean, log_std, a), -dist.log_prob(a).sum(-1), atol=1e-4)


def test_loss_targets():
    model, x = tiny(), tokens()
    expected = ((run(model, x).action - x["expert_actions"]) ** 2).mean()
    assert torch.allclose(model.loss(x, target="expert"), expected)
    assert not torch.allclose(model.loss(x, target="taken"), expected)
    with pytest.raises(UsageError, match="target"):
        model.loss(x, target="oracle")
    g = tiny(action_head="tanh_gaussian")
    out = run(g, x)
    assert torch.allclose(g.loss(x), tanh_gaussian_nll(out.mean, out.log_std, x["expert_actions"]).mean())
    assert torch.allclose(action_loss(out, x["actions"]), g.loss(x, target="taken"))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = tokens()
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model.loss(x).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("head", ["deterministic", "tanh_gaussian"])
def test_save_load_identical_outputs(tmp_path, head):
    model, x = tiny(action_head=head, attn_implementation="eager"), tokens()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = ICLPolicy.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert torch.equal(run(model, x).mean, run(loaded, x).mean)
    assert ICLPolicy.from_pretrained(tmp_path, attn_implementation="sdpa").attn_implementation == "sdpa"


def _one_line_error(path, match):
    with pytest.raises(UsageError) as e:
        ICLPolicy.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg


def test_bad_checkpoint_dirs_give_one_line_errors(tmp_path):
    _one_line_error(tmp_path / "nowhere", "nowhere")
    tiny().save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    _one_line_error(tmp_path / "a", "model.safetensors")
    tiny().save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").unlink()
    _one_line_error(tmp_path / "b", "config.json")
    tiny().save_pretrained(tmp_path / "c")  # weights of d=32 under a config saying d=64
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "d_model": 64}))
    _one_line_error(tmp_path / "c", "model.safetensors")
    (tmp_path / "c" / "config.json").write_text("{not json")
    _one_line_error(tmp_path / "c", "config.json")
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    _one_line_error(tmp_path / "c", "config.json")
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "action_head": "beta"}))
    _one_line_error(tmp_path / "c", "action_head")
    tiny().save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"garbage")
    _one_line_error(tmp_path / "d", "model.safetensors")


def test_config_validation():
    for bad in ({"action_head": "beta"}, {"attn_implementation": "flex"}, {"n_head": 3}, {"d_model": 0}):
        with pytest.raises(UsageError):
            ICLPolicyConfig(**bad)
    assert ICLPolicyConfig().max_positions == 4 * 500


def test_context_and_step_limits():
    model, x = tiny(max_context_episodes=2), tokens(episodes=3)  # 18 tokens > 2 x 8 positions
    with pytest.raises(UsageError, match="exceeds"):
        run(model, x)
    y = {n: v.clone() for n, v in tokens(episodes=1).items()}
    y["step_in_episode"][:, -1] = 8  # checked in forward on the CPU only (no host sync on an accelerator)
    with pytest.raises(UsageError, match="max_episode_length"):
        run(model, y)


def test_default_model_size():
    n = sum(p.numel() for p in ICLPolicy(ICLPolicyConfig()).parameters())
    # token_in + step/position embeddings + 3 blocks (12 d^2 + 13 d) + final norm + head, d=64
    d = 64
    expected = (45 * d + d) + 500 * d + 2000 * d + 3 * (12 * d * d + 13 * d) + 2 * d + (d * 4 + 4)
    assert n == expected and math.isclose(n / 1e6, 0.32, abs_tol=0.01)


@pytest.mark.parametrize("head", ["deterministic", "tanh_gaussian"])
def test_unlabelled_tokens_add_no_loss(head):
    """Targets holding NaN (a learner's context-only episodes) are left out of the loss, which equals the
    loss over the labelled tokens alone; a batch without labels gives 0 and finite gradients."""
    model, x = tiny(action_head=head), tokens(episodes=2)
    out = run(model, x)
    target = x["expert_actions"].clone()
    target[:, :EP] = float("nan")  # the first episode: context only
    masked = action_loss(out, target)
    sub = M.ICLPolicyOutput(action=out.action[:, EP:], mean=out.mean[:, EP:],
                            log_std=None if out.log_std is None else out.log_std[:, EP:])
    assert torch.allclose(masked, action_loss(sub, x["expert_actions"][:, EP:]), atol=1e-6)
    assert not torch.allclose(masked, action_loss(out, x["expert_actions"]), atol=1e-4)
    none = action_loss(out, torch.full_like(target, float("nan")))
    none.backward()
    assert none.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
