"""Reptile against its update written out by hand, inner SGD and inner Adam (torch.optim.Adam as reference)."""

import pytest
import torch

from gradient_meta.reptile import Reptile, ReptileConfig, adam_train
from icl_metarl.harness.errors import UsageError
from tests.test_maml import _sgd_by_hand, _tasks, linear_loss

torch.set_num_threads(1)


def test_sgd_reptile_matches_textbook():
    (xs, ys), _, w = _tasks()
    k, lr, eps = 3, 0.05, 0.5
    learner = Reptile({"w": w}, linear_loss, ReptileConfig(inner_steps=k, inner_lr=lr, meta_lr=eps))
    learner.step((xs, ys))
    # Nichol et al. 2018, Algorithm 2: phi_i = k SGD steps from w; w <- w + eps * mean_i(phi_i - w).
    phis = []
    for i in range(len(xs)):
        phi = w.clone()
        for _ in range(k):
            phi = phi - lr * 2 / len(xs[i]) * xs[i].T @ (xs[i] @ phi - ys[i])
        phis.append(phi)
    expected = w + eps * (torch.stack(phis).mean(0) - w)
    torch.testing.assert_close(learner.params["w"].detach(), expected, atol=1e-12, rtol=1e-10)


def test_inner_adam_matches_torch_optim_adam():
    (xs, ys), _, w = _tasks()
    got = adam_train(linear_loss, {"w": w}, (xs[0], ys[0]), steps=4, lr=0.1, betas=(0.5, 0.9))["w"]
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.Adam([ref], lr=0.1, betas=(0.5, 0.9), eps=1e-8)
    for _ in range(4):
        opt.zero_grad()
        linear_loss({"w": ref}, (xs[0], ys[0])).backward()
        opt.step()
    torch.testing.assert_close(got, ref.detach(), atol=1e-12, rtol=1e-10)


def test_adam_reptile_averages_adapted_weights():
    (xs, ys), _, w = _tasks()
    cfg = ReptileConfig(inner_steps=2, inner_lr=0.1, inner_optimizer="adam", meta_lr=1.0)
    learner = Reptile({"w": w}, linear_loss, cfg)
    learner.step((xs, ys))
    phis = [adam_train(linear_loss, {"w": w}, (xs[i], ys[i]), 2, 0.1, cfg.adam_betas)["w"] for i in range(len(xs))]
    # meta_lr 1 with SGD puts the initialisation exactly at the mean adapted weights
    torch.testing.assert_close(learner.params["w"].detach(), torch.stack(phis).mean(0), atol=1e-12, rtol=1e-10)


def test_config_rejects_bad_values():
    with pytest.raises(UsageError, match="inner steps"):
        ReptileConfig(inner_steps=0)
    with pytest.raises(UsageError, match="inner_lr"):
        ReptileConfig(inner_lr=-0.1)
    with pytest.raises(UsageError, match="unknown inner optimizer 'rmsprop'"):
        ReptileConfig(inner_optimizer="rmsprop")


@pytest.mark.parametrize("steps", [None, 0, 2])
def test_adapt_takes_exactly_the_steps_asked(steps):
    """``adapt(steps=0)`` is no step (the initialisation per task), None the configured k = 3."""
    (xs, ys), _, w = _tasks()
    learner = Reptile({"w": w}, linear_loss, ReptileConfig(inner_steps=3, inner_lr=0.05))
    want = _sgd_by_hand(w, (xs, ys), 0.05, 3 if steps is None else steps)
    torch.testing.assert_close(learner.adapt((xs, ys), steps)["w"], want, atol=1e-12, rtol=1e-10)
