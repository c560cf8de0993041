"""Meta-SGD's meta-gradients (initialisation and step sizes) against closed form; step sizes in checkpoints."""

import torch

from gradient_meta.checkpoint import load_checkpoint, save_checkpoint
from gradient_meta.maml import MAMLConfig
from gradient_meta.meta_sgd import MetaSGD, init_step_sizes
from tests.test_maml import _tasks, linear_loss

torch.set_num_threads(1)


def textbook(w, alpha, support, query):
    """Li et al. 2017, eq. 3 with least squares: w' = w - alpha o g_s; dL/dw = (I - H_s diag(alpha)) g_q(w'),
    dL/dalpha = -g_s o g_q(w')."""
    (xs, ys), (xq, yq) = support, query
    dw, dalpha = torch.zeros_like(w), torch.zeros_like(w)
    for i in range(len(xs)):
        n = xs[i].shape[0]
        g_s = 2 / n * xs[i].T @ (xs[i] @ w - ys[i])
        g_q = 2 / n * xq[i].T @ (xq[i] @ (w - alpha * g_s) - yq[i])
        dw += (torch.eye(len(w), dtype=w.dtype) - 2 / n * xs[i].T @ xs[i] @ torch.diag(alpha)) @ g_q
        dalpha += -g_s * g_q
    return dw / len(xs), dalpha / len(xs)


def test_meta_gradient_matches_textbook():
    s, q, w = _tasks()
    alpha = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)
    learner = MetaSGD({"w": w}, linear_loss, linear_loss, MAMLConfig(), step_sizes={"w": alpha})
    g = learner.meta_gradient(s, q)
    dw, dalpha = textbook(w, alpha, s, q)
    torch.testing.assert_close(g.params["w"], dw, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g.step_size["w"], dalpha, atol=1e-12, rtol=1e-10)


def test_step_moves_both_initialisation_and_step_sizes():
    s, q, w = _tasks()
    learner = MetaSGD({"w": w}, linear_loss, linear_loss, MAMLConfig(meta_lr=0.01))
    before = learner.step_sizes["w"].detach().clone()
    learner.step(s, q)
    assert not torch.equal(learner.step_sizes["w"].detach(), before)
    assert not torch.equal(learner.params["w"].detach(), w)


def test_init_step_sizes():
    p = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    const = init_step_sizes(p, 0.01)
    assert all(torch.equal(v, torch.full_like(p[k], 0.01)) for k, v in const.items())
    uni = init_step_sizes(p, generator=torch.Generator().manual_seed(0))
    assert all(v.shape == p[k].shape and v.min() >= 0.005 and v.max() <= 0.1 for k, v in uni.items())


def test_checkpoint_round_trip_keeps_step_sizes(tmp_path):
    params = {"net.0.weight": torch.randn(4, 1), "net.0.bias": torch.randn(4)}
    steps = init_step_sizes(params, generator=torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ck", params, steps, {"kind": "test", "config": {"x": 1}})
    p2, s2, cfg, rest = load_checkpoint(tmp_path / "ck")
    assert cfg["kind"] == "test" and cfg["learned_step_sizes"] is True and rest == {}
    for k in params:
        assert torch.equal(p2[k], params[k]) and torch.equal(s2[k], steps[k])
    save_checkpoint(tmp_path / "ck2", params, None, {"kind": "test"})
    assert load_checkpoint(tmp_path / "ck2")[1] is None


def test_checkpoint_errors_name_the_path(tmp_path):
    import pytest

    from icl_metarl.harness.errors import UsageError

    with pytest.raises(UsageError, match="has no model.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="cannot be read"):
        load_checkpoint(tmp_path)
