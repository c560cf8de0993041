"""Meta-SGD (Li et al. 2017): MAML whose inner step size is a learned tensor per parameter.

The step sizes alpha (shaped like the parameters, sign free) are meta-trained with the initialisation
by the same meta-gradient; nothing else differs from MAML.
"""

from __future__ import annotations

import torch

from gradient_meta.functional import MetaGradient, Params, StepSize, all_reduce_mean, apply_gradient, meta_gradient
from gradient_meta.maml import MAML, MAMLConfig


def init_step_sizes(params: Params, value: float | None = None, low: float = 0.005, high: float = 0.1,
                    generator: torch.Generator | None = None) -> Params:
    """One step size per parameter entry: ``value`` everywhere, or uniform in [low, high] as in the paper."""
    if value is not None:
        return {k: torch.full_like(v, value) for k, v in params.items()}
    return {k: low + (high - low) * torch.rand(v.shape, generator=generator, dtype=v.dtype)
            for k, v in params.items()}


class MetaSGD(MAML):
    """MAML with learned per-parameter step sizes ``self.step_sizes`` (initialised to ``inner_lr``)."""

    def __init__(self, params, inner_loss, outer_loss, config: MAMLConfig, accelerator=None,
                 step_sizes: Params | None = None):
        init = step_sizes if step_sizes is not None else init_step_sizes(params, config.inner_lr)
        self.step_sizes = {k: torch.nn.Parameter(v.detach().clone()) for k, v in init.items()}
        super().__init__(params, inner_loss, outer_loss, config, accelerator)

    @property
    def step_size(self) -> StepSize:
        return self.step_sizes

    def meta_parameters(self) -> list[torch.Tensor]:
        return list(self.params.values()) + list(self.step_sizes.values())

    def meta_gradient(self, support, query) -> MetaGradient:
        c = self.config
        g = meta_gradient(self.inner_loss, self.outer_loss, self.params, support, query, self.step_sizes,
                          c.inner_steps, c.first_order, learn_step_size=True, vectorise=c.vectorise)
        g.params = all_reduce_mean(g.params, self.accelerator)
        g.step_size = all_reduce_mean(g.step_size, self.accelerator)
        return g

    def step(self, support, query) -> float:
        g = self.meta_gradient(support, query)
        # Meta-SGD (Li et al. 2017), Algorithm 1: (theta, alpha) <- (theta, alpha) - beta * grad, one optimizer.
        apply_gradient(self.optimizer, {**{f"p.{k}": v for k, v in self.params.items()},
                                        **{f"a.{k}": v for k, v in self.step_sizes.items()}},
                       {**{f"p.{k}": v for k, v in g.params.items()},
                        **{f"a.{k}": v for k, v in g.step_size.items()}})
        return float(g.task_losses.mean())
