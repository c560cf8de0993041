"""Reptile (Nichol et al. 2018): train each task for k steps, move the initialisation toward the result.

The inner loop (SGD or Adam, written as pure functions so it vmaps over tasks) needs no second
derivative and no query batch; the meta-update is any torch optimizer fed with theta - mean(phi). k is at
least 2: with one SGD step the update is the multi-task gradient (Nichol et al. 2018, section 5).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap

from gradient_meta.config import SINUSOID_REPTILE_STEPS, check_reptile_steps, check_step_size
from gradient_meta.functional import LossFn, Params, adapt_tasks, all_reduce_weighted_mean, apply_gradient
from icl_metarl.harness.errors import choice_error

INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class ReptileConfig:
    """Settings of Reptile's inner training and its meta-update."""

    inner_steps: int = SINUSOID_REPTILE_STEPS
    """k >= 2: optimizer steps on a task's support batch (full batch each step)."""
    inner_lr: float = 0.01
    """Learning rate of the inner optimizer."""
    inner_optimizer: str = "sgd"
    """'sgd' or 'adam' (Adam state starts fresh for every task)."""
    meta_lr: float = 0.1
    """epsilon: fraction of the way the initialisation moves toward the mean adapted weights."""
    meta_optimizer: str = "sgd"
    """'sgd' (plain interpolation, the paper's rule) or 'adam' applied to theta - mean(phi)."""
    adam_betas: tuple[float, float] = (0.0, 0.999)
    """Inner Adam betas; beta1 = 0 as in the Reptile paper's experiments."""

    def __post_init__(self):
        check_reptile_steps(self.inner_steps)
        check_step_size(self.inner_lr, "inner_lr")
        check_step_size(self.meta_lr, "meta_lr")
        for what, v in (("inner optimizer", self.inner_optimizer), ("meta optimizer", self.meta_optimizer)):
            if v not in INNER_OPTIMIZERS:
                raise choice_error(what, v, INNER_OPTIMIZERS)


def sgd_train(loss: LossFn, params: Params, batch, steps: int, lr: float) -> Params:
    """``steps`` plain SGD steps on one task."""
    for _ in range(steps):
        g = grad(loss)(params, batch)
        params = {k: p - lr * g[k] for k, p in params.items()}
    return params


def adam_train(loss: LossFn, params: Params, batch, steps: int, lr: float,
               betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> Params:
    """``steps`` Adam steps on one task (Kingma & Ba 2015, Algorithm 1), state starting at zero."""
    b1, b2 = betas
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    for t in range(1, steps + 1):
        g = grad(loss)(params, batch)
        m = {k: b1 * m[k] + (1 - b1) * g[k] for k in params}
        v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in params}
        params = {k: p - lr * (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + eps)
                  for k, p in params.items()}
    return params


def reptile_direction(loss: LossFn, params: Params, support, config: ReptileConfig) -> tuple[Params, Tensor]:
    """theta - mean_i(phi_i) over the tasks of ``support`` (leading task axis), and each task's final loss.

    Reptile (Nichol et al. 2018), Algorithm 2 (batched): theta <- theta + eps * mean_i(phi_i - theta);
    handing theta - mean(phi) to SGD with learning rate eps is exactly that update. A task whose inner steps
    diverge (a non-finite weight or final loss: policy-gradient steps after the first are importance-weighted
    and unclipped) is left out of the mean, and its loss is NaN, so the NaN losses are exactly the tasks left
    out; if every task diverges the direction is zero. Where no task diverges the update is the paper's.
    """
    params = {k: v.detach() for k, v in params.items()}

    def one_task(batch):
        if config.inner_optimizer == "adam":
            phi = adam_train(loss, params, batch, config.inner_steps, config.inner_lr, config.adam_betas)
        else:
            phi = sgd_train(loss, params, batch, config.inner_steps, config.inner_lr)
        return phi, loss(phi, batch)

    phis, losses = vmap(one_task)(support)  # each phi: (T, *param.shape)
    finite = torch.stack([torch.isfinite(phi.flatten(1)).all(1) for phi in phis.values()]).all(0)  # (T,)
    finite = finite & torch.isfinite(losses)
    losses = torch.where(finite, losses, torch.full_like(losses, float("nan")))
    if not bool(finite.any()):
        return {k: torch.zeros_like(p) for k, p in params.items()}, losses
    return {k: params[k] - phis[k][finite].mean(0) for k in params}, losses


class Reptile:
    """An initialisation and its meta-optimizer, moved toward the weights each task trains to; the same
    interface as ``MAML`` (``update``, ``adapt``, ``step_size``, ``step_sizes``)."""

    step_sizes = None

    def __init__(self, params: Params, inner_loss: LossFn, config: ReptileConfig, accelerator=None):
        self.config, self.inner_loss, self.accelerator = config, inner_loss, accelerator
        self.params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
        opt = torch.optim.SGD if config.meta_optimizer == "sgd" else torch.optim.Adam
        self.optimizer = opt(list(self.params.values()), lr=config.meta_lr)

    @property
    def step_size(self) -> float:
        return self.config.inner_lr

    def step(self, support, query=None) -> float:
        """One meta-update from a batch of tasks; ``query`` is unused (Reptile learns from the support
        episodes alone: it has no outer loss)."""
        direction, losses = reptile_direction(self.inner_loss, self.params, support, self.config)
        diverged = int(torch.isnan(losses).sum())
        kept = losses.numel() - diverged  # each process's mean weighted by its kept tasks: exact over processes
        apply_gradient(self.optimizer, self.params, all_reduce_weighted_mean(direction, kept, self.accelerator))
        if diverged:
            warnings.warn(f"reptile: {diverged} of {losses.numel()} tasks' inner steps diverged (non-finite "
                          f"weights or loss); left out of this meta-update", RuntimeWarning, stacklevel=2)
        return float(losses.nanmean()) if diverged < losses.numel() else float("nan")

    def update(self, support, query=None) -> float:
        """One whole meta-update: Reptile's move (see ``step``)."""
        return self.step(support, query)

    def adapt(self, support, steps: int | None = None) -> Params:
        """Adapted parameters for a batch of tasks (leading task axis): plain SGD steps, as at test time."""
        steps = self.config.inner_steps if steps is None else steps  # 0: none, the initialisation for every task
        return adapt_tasks(self.inner_loss, self.params, support, self.step_size, steps)
