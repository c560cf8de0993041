"""The in-context policy's training objective: the action loss of its output against the expert's
action (DPT) or the one taken (AD-eps), MSE for the deterministic head, tanh-Gaussian NLL for the other.

Not for: the training loop (``train.py``) or the network (``model.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers.utils import ModelOutput

from icl_metarl.harness.errors import choice_error
from icl_metarl.incontext.config import TARGETS
from icl_metarl.incontext.tokens import shift_previous

# Expert actions saturate at exactly +-1 (clipped); atanh needs them strictly inside, so the
# tanh-Gaussian likelihood reads them at +-(1 - ATANH_EPS), i.e. atanh = +-3.8.
ATANH_EPS = 1e-3


def tanh_gaussian_nll(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """-log p(actions) per token (B,T) under tanh(N(mean, exp(log_std))), summed over action dims.

    Change of variables (Haarnoja et al. 2018, SAC, appendix C): log p(a) = log N(u) - sum log(1 - a^2),
    u = atanh(a); 1 - a^2 is written as 4 / (e^u + e^-u)^2 through softplus for stability.
    """
    a = actions.clamp(-1.0 + ATANH_EPS, 1.0 - ATANH_EPS)
    u = torch.atanh(a)
    normal_logp = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)^2)
    return -(normal_logp - log_det).sum(-1)


def action_loss(output: ModelOutput, target_actions: torch.Tensor) -> torch.Tensor:
    """Scalar loss over the labelled tokens of the policy's output (an ``ICLPolicyOutput``): MSE of the
    action for the deterministic head, NLL for the Gaussian. A token whose target holds NaN is unlabelled
    (context only, e.g. a learner's episodes before a hand-over): it adds no loss; a batch without any
    label gives 0."""
    target = target_actions.float()
    labelled = ~torch.isnan(target).any(-1)  # (B, T)
    target = torch.where(rearrange(labelled, "b t -> b t 1"), target, torch.zeros_like(target))
    if output.log_std is None:
        per_token = ((output.action.float() - target) ** 2).mean(-1)  # (B, T)
    else:
        per_token = tanh_gaussian_nll(output.mean.float(), output.log_std.float(), target)  # (B, T)
    return (per_token * labelled).sum() / labelled.sum().clamp(min=1)


def window_loss(model, batch: dict, target: str = "expert") -> torch.Tensor:
    """The action loss of a windows batch (B,W,...) through ``model``'s forward: the expert's action
    (DPT) or the one taken (AD-eps) as target. ``model`` may be a DDP wrapper, whose forward all-reduces
    the gradients in backward: the reason this is a function and not only ``ICLPolicy.loss``."""
    if target not in TARGETS:
        raise choice_error("target", target, TARGETS)
    prev_actions, prev_rewards = shift_previous(batch["actions"], batch["rewards"], batch["episode_start"])
    out = model(batch["obs"], prev_actions, prev_rewards, batch["episode_start"], batch["step_in_episode"])
    return action_loss(out, batch["expert_actions"] if target == "expert" else batch["actions"])
