"""Every interval and test the project reports, computed in one place: a hierarchical percentile bootstrap
over training runs, tasks and evaluation seeds (of a mean, an interquartile mean or a paired difference),
the exact sign test, and the normal and t intervals of the probes and the few-shot study.

Scores come as arrays (runs, tasks, seeds): a run is one trained agent (a training seed), a task one test
task, a seed one evaluation seed; (tasks, seeds) is one run. NaN marks a cell without a record.
Not for: reading results or writing tables (``report.py``, ``comparison.py``). Pure functions; a
bootstrap is deterministic given its ``seed``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import numpy as np
from scipy import stats

#: the normal intervals' 95% quantile, rounded as they have always been written (1.96 standard errors)
Z95 = 1.96


class Interval(NamedTuple):
    """A figure and its percentile bootstrap interval; all NaN when there is no record."""

    estimate: float
    low: float
    high: float


class WonLost(NamedTuple):
    """A paired comparison counted task by task, with the exact sign test over the tasks that differ."""

    won: int
    lost: int
    tasks: int
    """tasks with at least one record"""
    p: float


def as_runs(values: np.ndarray) -> np.ndarray:
    """``values`` as (runs, tasks, seeds) floats: a (tasks, seeds) array is one run."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2:
        return values[None]
    if values.ndim != 3:
        raise ValueError(f"scores must be (tasks, seeds) or (runs, tasks, seeds), got shape {values.shape}")
    return values


# ------------------------------------------------------------------------------ the bootstrap
def resample(values: np.ndarray, num_resamples: int, seed: int = 0) -> np.ndarray:
    """(R, runs, tasks, seeds) draws: runs with replacement, then tasks within each drawn run, then seeds
    within each drawn task (a two-stage bootstrap: runs are the units of training, tasks of the benchmark,
    seeds are nested in tasks; Agarwal et al. 2021 resample runs, here tasks are a sample too)."""
    R, (N, T, S) = num_resamples, values.shape
    rng = np.random.default_rng(seed)
    # tasks and seeds are drawn before runs, so that the draws for one run are the ones the evaluator made
    # before runs were pooled (its report figures do not move)
    tasks = rng.integers(T, size=(R, N, T))
    seeds = rng.integers(S, size=(R, N, T, S))
    runs = rng.integers(N, size=(R, N))
    return values[runs[:, :, None, None], tasks[..., None], seeds]  # (R, N, T, S)


def _bootstrap(values: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], num_resamples: int,
               level: float, seed: int) -> Interval:
    """``statistic`` maps (B, runs, tasks, seeds) to (B,); its value on the data and its percentile interval."""
    values = as_runs(values)
    values = values[:, ~np.all(np.isnan(values), axis=(0, 2))]  # tasks with no record at all
    if values.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    with warnings.catch_warnings():  # a resample of only missing cells is NaN, and skipped below
        warnings.simplefilter("ignore", RuntimeWarning)
        estimate = float(statistic(values[None])[0])
        draws = statistic(resample(values, num_resamples, seed))  # (R,)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(draws, [alpha, 1.0 - alpha])
    return Interval(estimate, float(low), float(high))


def _mean(draws: np.ndarray) -> np.ndarray:
    return np.nanmean(draws.reshape(len(draws), -1), axis=1)


def _iqm(draws: np.ndarray) -> np.ndarray:
    per_cell = np.nanmean(draws, axis=3)  # (B, runs, tasks): a run's score on a task, seeds averaged
    return _trimmed_means(per_cell.reshape(len(draws), -1))


def mean_interval(values: np.ndarray, num_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``values`` (runs, tasks, seeds) or (tasks, seeds), over every cell with a record, and its
    percentile interval from ``resample``. With one run: tasks, then seeds within tasks."""
    return _bootstrap(values, _mean, num_resamples, level, seed)


def iqm_interval(values: np.ndarray, num_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Interquartile mean of the (run, task) scores (seeds averaged within each), as rliable reports it
    (Agarwal et al. 2021), and its percentile interval from ``resample``."""
    return _bootstrap(values, _iqm, num_resamples, level, seed)


def difference_interval(a: np.ndarray, b: np.ndarray, num_resamples: int = 2000, level: float = 0.95,
                        seed: int = 0) -> Interval:
    """Mean of ``a - b`` paired cell by cell (run i of A with run i of B, task with task, seed with seed) and
    its interval: the same draws for both sides, so what the pair shares cancels."""
    a, b = as_runs(a), as_runs(b)
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs scores of one shape, got {a.shape} and {b.shape}")
    return mean_interval(a - b, num_resamples, level, seed)


# ----------------------------------------------------------------------------- point figures
def _trimmed_means(x: np.ndarray) -> np.ndarray:
    """Per row of ``x`` (B, M): the mean of its middle half, NaN left out; the cut is
    ``scipy.stats.trim_mean(row, 0.25)``'s (n // 4 values off each end)."""
    x = np.sort(x, axis=1)  # NaN sorts last
    n = np.sum(~np.isnan(x), axis=1, keepdims=True)  # (B, 1)
    cut = n // 4
    position = np.arange(x.shape[1])
    keep = (position >= cut) & (position < n - cut)  # (B, M)
    return np.where(keep, x, 0.0).sum(axis=1) / keep.sum(axis=1)


def interquartile_mean(scores: np.ndarray) -> float:
    """Mean of the middle half of ``scores`` (any shape, NaN left out): robust to a few outlying tasks
    or runs, less noisy than the median. NaN when there is no score."""
    flat = np.asarray(scores, dtype=np.float64).reshape(1, -1)
    with np.errstate(invalid="ignore"):
        return float(_trimmed_means(flat)[0])


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test for paired successes): the chance of a split at
    least this uneven among the ``wins + losses`` untied tasks if either side were equally likely."""
    n = wins + losses
    if n == 0:
        return 1.0
    return float(stats.binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def won_lost(diff: np.ndarray) -> WonLost:
    """Paired differences (runs, tasks, seeds) or (tasks, seeds) -> tasks won, tasks lost, tasks with a
    record, sign test p. Runs and seeds are averaged within a task first: tasks are the units counted."""
    diff = as_runs(diff)
    with warnings.catch_warnings():  # a task without records has a NaN mean and counts for neither side
        warnings.simplefilter("ignore", RuntimeWarning)
        per_task = np.nanmean(diff, axis=(0, 2))
    won, lost = int(np.sum(per_task > 0)), int(np.sum(per_task < 0))
    return WonLost(won, lost, int(np.isfinite(per_task).sum()), sign_test(won, lost))


# ------------------------------------------------------------------ intervals from a few units
def normal_interval(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Mean along ``axis`` and the 95% normal half-width (1.96 standard errors); the half-width is NaN
    with fewer than 2 values. For many units (tasks, trials), where the normal approximation holds."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis]
    with np.errstate(invalid="ignore"):  # an infinite value (a diverged learner) makes a NaN spread
        mean = x.mean(axis=axis)
        half = Z95 * x.std(axis=axis, ddof=1) / math.sqrt(n) if n > 1 else np.full(mean.shape, math.nan)
    return mean, half


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean of a few values (e.g. one figure per training seed) and the t half-width with the value as the
    unit (n - 1 degrees of freedom); the half-width is NaN for one value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
