"""MAML against its update written out by hand on a linear least-squares model (closed-form gradients)."""

import pytest
import torch

from gradient_meta.maml import MAML, MAMLConfig
from icl_metarl.harness.errors import UsageError

torch.set_num_threads(1)  # tiny problems: a second thread only adds contention on a shared CPU


def linear_loss(params, batch):
    x, y = batch
    return ((x @ params["w"] - y) ** 2).mean()


def _tasks(t=4, n=6, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(t, n, d, generator=g, dtype=torch.float64), torch.randn(t, n, generator=g, dtype=torch.float64)
    xq, yq = torch.randn(t, n, d, generator=g, dtype=torch.float64), torch.randn(t, n, generator=g, dtype=torch.float64)
    return (xs, ys), (xq, yq), torch.randn(d, generator=g, dtype=torch.float64)


def textbook(w, support, query, alpha, first_order):
    """Finn et al. 2017, Algorithm 2 with one inner step, least squares in closed form:
    grad L(w) = 2/n X^T (X w - y), Hessian H = 2/n X^T X; MAML's meta-gradient is (I - alpha H_s) grad L_q(w')."""
    (xs, ys), (xq, yq) = support, query
    out = torch.zeros_like(w)
    for i in range(len(xs)):
        n = xs[i].shape[0]
        w_adapted = w - alpha * 2 / n * xs[i].T @ (xs[i] @ w - ys[i])
        g_query = 2 / n * xq[i].T @ (xq[i] @ w_adapted - yq[i])
        hessian = 2 / n * xs[i].T @ xs[i]
        out += g_query if first_order else (torch.eye(len(w), dtype=w.dtype) - alpha * hessian) @ g_query
    return out / len(xs)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_textbook(first_order):
    s, q, w = _tasks()
    learner = MAML({"w": w}, linear_loss, linear_loss, MAMLConfig(inner_lr=0.1, first_order=first_order))
    got = learner.meta_gradient(s, q).params["w"]
    torch.testing.assert_close(got, textbook(w, s, q, 0.1, first_order), atol=1e-12, rtol=1e-10)
    # first and second order differ here, so each comparison can fail
    other = textbook(w, s, q, 0.1, not first_order)
    assert (got - other).abs().max() > 1e-3


def test_step_applies_adam_to_the_meta_gradient():
    s, q, w = _tasks()
    learner = MAML({"w": w}, linear_loss, linear_loss, MAMLConfig(inner_lr=0.1, meta_lr=0.01))
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.Adam([ref], lr=0.01)
    for _ in range(3):
        ref.grad = textbook(ref.detach(), s, q, 0.1, False)
        opt.step()
        learner.step(s, q)
    torch.testing.assert_close(learner.params["w"].detach(), ref.detach(), atol=1e-10, rtol=0)


def test_config_rejects_bad_values():
    with pytest.raises(UsageError, match="inner steps"):
        MAMLConfig(inner_steps=0)
    with pytest.raises(UsageError, match="inner_lr"):
        MAMLConfig(inner_lr=0.0)
    with pytest.raises(UsageError, match="meta_lr"):
        MAMLConfig(meta_lr=-1e-3)


def _sgd_by_hand(w, support, alpha, steps):
    """Each task's weights after ``steps`` least-squares gradient steps, written out; (T, d)."""
    xs, ys = support
    out = []
    for x, y in zip(xs, ys):
        phi = w.clone()
        for _ in range(steps):
            phi = phi - alpha * 2 / len(x) * x.T @ (x @ phi - y)
        out.append(phi)
    return torch.stack(out)


@pytest.mark.parametrize("steps", [None, 0, 1, 3])
def test_adapt_takes_exactly_the_steps_asked(steps):
    """``adapt(steps=0)`` is no step (the initialisation per task), None the configured two."""
    s, _, w = _tasks()
    learner = MAML({"w": w}, linear_loss, linear_loss, MAMLConfig(inner_lr=0.1, inner_steps=2))
    got = learner.adapt(s, steps)["w"]
    torch.testing.assert_close(got, _sgd_by_hand(w, s, 0.1, 2 if steps is None else steps), atol=1e-12, rtol=1e-10)
    assert got.shape == (len(s[0]), len(w))


def test_adapt_refuses_negative_steps():
    s, _, w = _tasks()
    learner = MAML({"w": w}, linear_loss, linear_loss, MAMLConfig(inner_lr=0.1))
    with pytest.raises(UsageError, match="adaptation steps must be an integer >= 0, got -1"):
        learner.adapt(s, -1)
