"""The shared inner loop of MAML, Meta-SGD and Reptile, as pure functions of a parameter dict.

A task's losses are functions ``loss(params, batch) -> scalar``; this module adapts ``params`` on a
support batch, scores the query batch and returns meta-gradients, vmapped over the tasks of a
meta-batch (``torch.func``) or, for models that cannot be vmapped, in a per-task loop. It knows nothing
of sinusoids, policies or optimizers; the algorithms and the RL form (issue #8) plug their losses in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from icl_metarl.harness.errors import UsageError

Params = dict[str, Tensor]
"""Parameter name -> tensor, as ``dict(model.named_parameters())`` gives them."""
LossFn = Callable[[Params, Any], Tensor]
"""``loss(params, batch) -> scalar``; ``batch`` is any pytree of tensors for ONE task."""
StepSize = Union[float, Tensor, Params]
"""A scalar inner step size (MAML) or one tensor per parameter, shaped like it (Meta-SGD)."""


def sgd_update(params: Params, grads: Params, step_size: StepSize, first_order: bool = False) -> Params:
    """One gradient-descent step; a dict step size is elementwise, as in Meta-SGD.

    MAML (Finn et al. 2017), eq. 1: theta' = theta - alpha * grad.  Meta-SGD (Li et al. 2017), eq. 3:
    theta' = theta - alpha o grad with alpha shaped like theta.  First order detaches the inner gradient,
    so d theta'/d theta = I (FOMAML) while d theta'/d alpha = -grad still flows to a learned alpha.
    """
    out = {}
    for name, p in params.items():
        g = grads[name].detach() if first_order else grads[name]
        lr = step_size[name] if isinstance(step_size, dict) else step_size
        out[name] = p - lr * g
    return out


def adapt(inner_loss: LossFn, params: Params, support, step_size: StepSize, steps: int = 1,
          first_order: bool = False) -> Params:
    """Adapted parameters of one task after ``steps`` gradient steps on its support batch."""
    for _ in range(steps):
        params = sgd_update(params, grad(inner_loss)(params, support), step_size, first_order)
    return params


def task_query_loss(inner_loss: LossFn, outer_loss: LossFn, params: Params, step_size: StepSize,
                    support, query, steps: int = 1, first_order: bool = False) -> Tensor:
    """Query loss of one task after adapting on its support: the quantity MAML differentiates."""
    adapted = adapt(inner_loss, params, support, step_size, steps, first_order)
    return outer_loss(adapted, query)


@dataclass
class MetaGradient:
    """Meta-gradients averaged over the tasks of a meta-batch, and the per-task query losses."""

    params: Params
    """d(mean query loss)/d(initial params), one tensor per parameter."""
    step_size: Params | None
    """d(mean query loss)/d(step sizes) when the step sizes are learned (Meta-SGD), else None."""
    task_losses: Tensor
    """(T,) post-adaptation query loss of each task, detached."""


def _task_at(batch, i: int):
    return tree_map(lambda x: x[i], batch)


def num_tasks(batch) -> int:
    leaves = []
    tree_map(lambda x: leaves.append(x), batch)
    return int(leaves[0].shape[0])


def meta_gradient(inner_loss: LossFn, outer_loss: LossFn, params: Params, support, query,
                  step_size: StepSize, steps: int = 1, first_order: bool = False,
                  learn_step_size: bool = False, vectorise: bool = True) -> MetaGradient:
    """Meta-gradient of the mean post-adaptation query loss over a meta-batch.

    ``support`` and ``query`` are pytrees whose leaves carry the task as their first axis (T, ...).
    ``learn_step_size`` also differentiates w.r.t. a dict ``step_size`` (Meta-SGD). ``vectorise``
    runs all tasks in one vmapped call; False loops over tasks (for models vmap cannot trace).
    """
    params = {k: v.detach() for k, v in params.items()}
    if isinstance(step_size, dict):
        step_size = {k: v.detach() for k, v in step_size.items()}
    if learn_step_size and not isinstance(step_size, dict):
        raise TypeError("learn_step_size needs one step-size tensor per parameter (a dict)")
    argnums = (0, 1) if learn_step_size else 0

    def one_task(p, lr, s, q):
        loss = task_query_loss(inner_loss, outer_loss, p, lr, s, q, steps, first_order)
        return loss, loss.detach()

    if vectorise:
        def mean_loss(p, lr):
            losses, _ = vmap(one_task, in_dims=(None, None, 0, 0))(p, lr, support, query)  # (T,)
            return losses.mean(), losses.detach()

        grads, losses = grad(mean_loss, argnums=argnums, has_aux=True)(params, step_size)
    else:
        t = num_tasks(support)
        per_task = [grad(one_task, argnums=argnums, has_aux=True)(params, step_size, _task_at(support, i),
                                                                   _task_at(query, i)) for i in range(t)]
        grads = tree_map(lambda *gs: torch.stack(gs).mean(0), *[g for g, _ in per_task])
        losses = torch.stack([loss for _, loss in per_task])
    if learn_step_size:
        return MetaGradient(params=grads[0], step_size=grads[1], task_losses=losses)
    return MetaGradient(params=grads, step_size=None, task_losses=losses)


def adapt_tasks(inner_loss: LossFn, params: Params, support, step_size: StepSize, steps: int = 1) -> Params:
    """Adapted parameters of every task of a batch, each tensor with a leading task axis (T, ...);
    ``steps=0``: the initialisation itself, once per task (no adaptation)."""
    if not isinstance(steps, int) or steps < 0:
        raise UsageError(f"adaptation steps must be an integer >= 0, got {steps!r}")
    params = {k: v.detach() for k, v in params.items()}
    if isinstance(step_size, dict):
        step_size = {k: v.detach() for k, v in step_size.items()}
    return vmap(lambda s: adapt(inner_loss, params, s, step_size, steps, first_order=True))(support)


# ---- data parallel over the meta-batch -------------------------------------------------------------

def local_tasks(meta_batch: int, num_processes: int, process_index: int) -> slice:
    """This process's share of a meta-batch; every process must get the same number of tasks."""
    if meta_batch < 1 or meta_batch % num_processes:
        raise UsageError(f"meta-batch {meta_batch} does not divide among {num_processes} processes; "
                         f"use a multiple of {num_processes}")
    share = meta_batch // num_processes
    return slice(process_index * share, (process_index + 1) * share)


def all_reduce_mean(grads: Params, accelerator=None) -> Params:
    """Average gradients over processes (equal shares make the mean of means the global mean)."""
    if accelerator is None or accelerator.num_processes == 1:
        return grads
    return {k: accelerator.reduce(v.contiguous(), reduction="mean") for k, v in grads.items()}


def all_reduce_weighted_mean(means: Params, count: int, accelerator=None) -> Params:
    """The mean over every process's items, where this process's ``means`` average its own ``count`` items:
    sum_p count_p * means_p / sum_p count_p. Processes may keep different numbers of items (Reptile leaves
    diverged tasks out), where the plain mean of means would weight them wrongly; zero where none has any."""
    if accelerator is None or accelerator.num_processes == 1:
        return means
    total = float(accelerator.reduce(torch.tensor(float(count)), reduction="sum"))
    summed = {k: accelerator.reduce((v * count).contiguous(), reduction="sum") for k, v in means.items()}
    return {k: v / total if total else torch.zeros_like(v) for k, v in summed.items()}


def apply_gradient(optimizer: torch.optim.Optimizer, tensors: Params, grads: Params) -> None:
    """Hand precomputed gradients to a torch optimizer and take its step."""
    for name, t in tensors.items():
        t.grad = grads[name].detach().to(t.dtype).clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
