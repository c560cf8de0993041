"""The shared inner loop: vmapped meta-gradients against a per-task loop and finite differences."""

import pytest
import torch

from gradient_meta.config import check_inner_steps, check_step_size
from gradient_meta.functional import adapt_tasks, all_reduce_mean, local_tasks, meta_gradient, task_query_loss
from gradient_meta.meta_sgd import init_step_sizes
from gradient_meta.sinusoid import SineNet, mse_loss_fn, sample_points, sample_tasks
from icl_metarl.harness.errors import UsageError

torch.set_num_threads(1)  # tiny nets: a second thread only adds contention on a shared CPU


def _setup(tasks=6, shots=5, hidden=40, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = SineNet(hidden).to(dtype)
    g = torch.Generator().manual_seed(seed)
    amp, phase = sample_tasks(tasks, g)
    support = tuple(t.to(dtype) for t in sample_points(amp, phase, shots, g))
    query = tuple(t.to(dtype) for t in sample_points(amp, phase, shots, g))
    return model, mse_loss_fn(model), dict(model.named_parameters()), support, query


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_vmap_equals_loop(first_order, steps):
    _, loss, params, s, q = _setup()
    vec = meta_gradient(loss, loss, params, s, q, 0.01, steps, first_order, vectorise=True)
    loop = meta_gradient(loss, loss, params, s, q, 0.01, steps, first_order, vectorise=False)
    for k in params:
        torch.testing.assert_close(vec.params[k], loop.params[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(vec.task_losses, loop.task_losses, atol=1e-5, rtol=0)


def test_meta_sgd_vmap_equals_loop():
    _, loss, params, s, q = _setup()
    lr = init_step_sizes(params, generator=torch.Generator().manual_seed(3))
    vec = meta_gradient(loss, loss, params, s, q, lr, 2, learn_step_size=True, vectorise=True)
    loop = meta_gradient(loss, loss, params, s, q, lr, 2, learn_step_size=True, vectorise=False)
    for k in params:
        torch.testing.assert_close(vec.params[k], loop.params[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(vec.step_size[k], loop.step_size[k], atol=1e-5, rtol=0)


def _mean_query_loss(loss, params, lr, s, q, steps):
    t = s[0].shape[0]
    return sum(task_query_loss(loss, loss, params, lr, (s[0][i], s[1][i]), (q[0][i], q[1][i]), steps)
               for i in range(t)) / t


@pytest.mark.parametrize("learn_step_size", [False, True])
def test_meta_gradient_matches_finite_differences(learn_step_size):
    # float64 and a 1-4-4-1 net so central differences are accurate to ~1e-8.
    _, loss, params, s, q = _setup(tasks=3, shots=4, hidden=4, dtype=torch.float64)
    lr = init_step_sizes(params, generator=torch.Generator().manual_seed(1)) if learn_step_size else 0.05
    lr = {k: v.double() for k, v in lr.items()} if learn_step_size else lr
    g = meta_gradient(loss, loss, params, s, q, lr, 2, learn_step_size=learn_step_size)
    eps = 1e-6
    targets = [("params", k) for k in params] + ([("lr", k) for k in params] if learn_step_size else [])
    for which, k in targets:
        base = params if which == "params" else lr
        for idx in range(min(3, base[k].numel())):
            def f(delta):
                t = base[k].detach().clone().reshape(-1)
                t[idx] += delta
                moved = {**base, k: t.reshape(base[k].shape)}
                p, a = (moved, lr) if which == "params" else (params, moved)
                return float(_mean_query_loss(loss, p, a, s, q, 2).detach())
            fd = (f(eps) - f(-eps)) / (2 * eps)
            analytic = (g.params if which == "params" else g.step_size)[k].reshape(-1)[idx]
            assert abs(float(analytic) - fd) < 1e-6 * max(1.0, abs(fd)), (which, k, idx, float(analytic), fd)


def test_adapt_tasks_matches_one_task_at_a_time():
    _, loss, params, s, _ = _setup(tasks=4)
    batched = adapt_tasks(loss, params, s, 0.02, steps=3)
    for i in range(4):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        for _ in range(3):  # plain autograd, a second way
            grads = torch.autograd.grad(loss(p, (s[0][i], s[1][i])), list(p.values()))
            p = {k: (v - 0.02 * gk).detach().requires_grad_() for (k, v), gk in zip(p.items(), grads)}
        for k in params:
            torch.testing.assert_close(batched[k][i], p[k].detach(), atol=1e-6, rtol=1e-5)


def test_bad_inner_steps_and_step_size():
    for bad in (0, -1, 1.5):
        with pytest.raises(UsageError, match="inner steps"):
            check_inner_steps(bad)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="step size"):
            check_step_size(bad)
    assert check_inner_steps(3) == 3 and check_step_size(0.5) == 0.5


def test_meta_batch_must_divide_among_processes():
    with pytest.raises(UsageError, match="meta-batch 25 does not divide among 2 processes"):
        local_tasks(25, 2, 0)
    shares = [local_tasks(24, 3, i) for i in range(3)]
    assert [list(range(24))[s] for s in shares] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_all_reduce_mean_is_identity_on_one_process():
    g = {"w": torch.arange(3.0)}
    assert all_reduce_mean(g, None) is g
