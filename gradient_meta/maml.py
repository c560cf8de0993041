"""MAML (Finn et al. 2017): learn an initialisation that a few gradient steps adapt to a new task.

Second order by default, first order (FOMAML) as an option. The losses are plugged in, so the same
learner trains on supervised support/query batches (sinusoid) and on RL episodes (issue #8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradient_meta.config import check_inner_steps, check_step_size
from gradient_meta.functional import (
    LossFn,
    MetaGradient,
    Params,
    StepSize,
    adapt_tasks,
    all_reduce_mean,
    apply_gradient,
    meta_gradient,
)


@dataclass
class MAMLConfig:
    """Settings of MAML's inner loop and meta-optimizer."""

    inner_steps: int = 1
    """Gradient steps on a task's support batch before its query loss is taken."""
    inner_lr: float = 0.01
    """Inner step size alpha (Meta-SGD: the initial value of every learned step size)."""
    first_order: bool = False
    """Drop second-order terms (FOMAML): cheaper, the inner gradient is treated as a constant."""
    meta_lr: float = 1e-3
    """Adam learning rate of the meta-optimizer (beta in the paper)."""
    vectorise: bool = True
    """vmap over the tasks of a meta-batch; False loops over tasks (models vmap cannot trace)."""
    epochs: int = 1
    """Meta-gradient steps per meta-batch on the same episodes (PPO epochs in meta-RL)."""

    def __post_init__(self):
        check_inner_steps(self.inner_steps)
        check_step_size(self.inner_lr, "inner_lr")
        check_step_size(self.meta_lr, "meta_lr")
        check_inner_steps(self.epochs)


class MAML:
    """An initialisation, its meta-optimizer (Adam) and the losses that define a task.

    The interface every meta-learner here shares (MAML, Meta-SGD, Reptile): ``params``, ``step_sizes``
    (learned per-parameter step sizes or None), ``step_size`` (what adaptation steps with),
    ``optimizer``, ``update(support, query)`` (one whole meta-update from a meta-batch) and
    ``adapt(support)`` (the test-time inner loop).
    """

    step_sizes = None

    def __init__(self, params: Params, inner_loss: LossFn, outer_loss: LossFn, config: MAMLConfig,
                 accelerator=None):
        self.config = config
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        self.accelerator = accelerator
        self.params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
        self.optimizer = torch.optim.Adam(self.meta_parameters(), lr=config.meta_lr)

    @property
    def step_size(self) -> StepSize:
        return self.config.inner_lr

    def meta_parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def meta_gradient(self, support, query) -> MetaGradient:
        """Meta-gradient over this process's tasks, averaged over processes."""
        c = self.config
        g = meta_gradient(self.inner_loss, self.outer_loss, self.params, support, query, self.step_size,
                          c.inner_steps, c.first_order, learn_step_size=False, vectorise=c.vectorise)
        g.params = all_reduce_mean(g.params, self.accelerator)
        return g

    def step(self, support, query) -> float:
        """One meta-update; returns the mean post-adaptation query loss of this process's tasks."""
        g = self.meta_gradient(support, query)
        apply_gradient(self.optimizer, self.params, g.params)
        return float(g.task_losses.mean())

    def update(self, support, query) -> float:
        """One whole meta-update from a meta-batch: ``epochs`` meta-gradient steps on it; the last loss."""
        for _ in range(self.config.epochs):
            loss = self.step(support, query)
        return loss

    def adapt(self, support, steps: int | None = None) -> Params:
        """Adapted parameters for a batch of tasks (leading task axis), as at test time; ``steps``: inner
        steps (None: the configured ``inner_steps``; 0: none, the initialisation for every task)."""
        steps = self.config.inner_steps if steps is None else steps
        return adapt_tasks(self.inner_loss, self.params, support, self.step_size, steps)
