"""Reference solvers of few-shot regression: what a learner that knows the family's form can do.

Least squares and ridge for linear tasks (ridge with lambda = noise variance and a N(0, I) prior on w is
the Bayes posterior mean); k nearest neighbours and a Gaussian-process (RBF kernel) regressor for
sinusoids. Pure batched functions: support_x (T, K, d), support_y (T, K, 1) or (T, K), query_x (T, Q, d)
-> predictions (T, Q). Not for: learned models (``evaluation.py`` wraps those).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _y(support_y: Tensor) -> Tensor:
    return support_y.reshape(*support_y.shape[:2], 1)  # (T, K, 1)


def least_squares(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
    """Minimum-norm least squares w = pinv(X) y (the ordinary solution when K >= d), predicted at the queries."""
    w = torch.linalg.pinv(support_x.double()) @ _y(support_y).double()  # (T, d, 1)
    return (query_x.double() @ w)[..., 0].to(query_x.dtype)


def ridge(support_x: Tensor, support_y: Tensor, query_x: Tensor, lam: float) -> Tensor:
    """Ridge regression w = (X^T X + lam I)^-1 X^T y, predicted at the queries."""
    x, y = support_x.double(), _y(support_y).double()
    gram = x.transpose(1, 2) @ x + lam * torch.eye(x.shape[-1], dtype=x.dtype)  # (T, d, d)
    w = torch.linalg.solve(gram, x.transpose(1, 2) @ y)  # (T, d, 1)
    return (query_x.double() @ w)[..., 0].to(query_x.dtype)


def nearest_neighbours(support_x: Tensor, support_y: Tensor, query_x: Tensor, k: int) -> Tensor:
    """Mean target of the ``k`` support points nearest each query (all of them when fewer)."""
    k = min(k, support_x.shape[1])
    dist = torch.cdist(query_x, support_x)  # (T, Q, K)
    idx = dist.topk(k, dim=-1, largest=False).indices  # (T, Q, k)
    y = _y(support_y)[..., 0]  # (T, K)
    return torch.gather(y[:, None, :].expand(-1, idx.shape[1], -1), 2, idx).mean(-1)


def gaussian_process(support_x: Tensor, support_y: Tensor, query_x: Tensor, lengthscale: float,
                     signal_var: float, noise_var: float) -> Tensor:
    """Posterior mean of a zero-mean GP with kernel signal_var * exp(-|x - x'|^2 / (2 lengthscale^2))."""
    def kernel(a, b):
        return signal_var * torch.exp(-torch.cdist(a, b) ** 2 / (2 * lengthscale**2))

    x, xq, y = support_x.double(), query_x.double(), _y(support_y).double()
    gram = kernel(x, x) + noise_var * torch.eye(x.shape[1], dtype=x.dtype)  # (T, K, K)
    alpha = torch.linalg.solve(gram, y)  # (T, K, 1)
    return (kernel(xq, x) @ alpha)[..., 0].to(query_x.dtype)
