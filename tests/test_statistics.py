"""icl_metarl.harness.statistics: intervals and tests against figures worked out by hand on tiny inputs,
and against a second way of computing them (scipy, enumeration, the evaluator's earlier bootstrap)."""

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.stats import trim_mean

from icl_metarl.harness import statistics as st


def earlier_bootstrap_ci(values, num_resamples=2000, level=0.95, seed=0):
    """The evaluator's bootstrap before runs were pooled (report.bootstrap_ci), verbatim: one run's
    figures must not move."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.all(np.isnan(values), axis=1)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    T, S = values.shape
    tasks = rng.integers(T, size=(num_resamples, T))
    seeds = rng.integers(S, size=(num_resamples, T, S))
    draws = values[tasks[:, :, None], seeds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(draws.reshape(num_resamples, -1), axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.nanquantile(means, [alpha, 1.0 - alpha])
    return float(np.nanmean(values)), float(lo), float(hi)


# ------------------------------------------------------------------------------------- one run
@pytest.mark.parametrize("shape, seed", [((30, 2), 0), ((7, 1), 1), ((50, 3), 2)])
def test_one_run_equals_the_earlier_bootstrap(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.binomial(1, 0.4, size=shape).astype(float)
    x[0, 0] = np.nan  # a missing cell
    x[-1] = np.nan  # a task without any record
    want = earlier_bootstrap_ci(x, 500, seed=seed)
    assert tuple(st.mean_interval(x, 500, seed=seed)) == want  # bit for bit
    assert tuple(st.mean_interval(x[None], 500, seed=seed)) == want  # (1, tasks, seeds): the same


def test_one_run_three_tasks_by_hand():
    # tasks [0, 0, 1]: a resample holds k ~ Binomial(3, 1/3) ones, mean k/3 with P = 8, 12, 6, 1 (/27);
    # 2.5% of the mass lies in k = 0 and P(k = 3) = 1/27 > 2.5%: the interval is [0, 1]
    m, lo, hi = st.mean_interval(np.array([[0.0], [0.0], [1.0]]), 4000)
    assert (m, lo, hi) == (pytest.approx(1 / 3), 0.0, 1.0)
    draws = st.resample(np.array([[[0.0], [0.0], [1.0]]]), 20000).mean(axis=(1, 2, 3))
    for k, p in enumerate((8, 12, 6, 1)):
        assert np.mean(np.isclose(draws, k / 3)) == pytest.approx(p / 27, abs=0.01)


def test_bootstrap_matches_normal_approximation():
    rng = np.random.default_rng(1)
    x = rng.binomial(1, 0.3, size=(400, 1)).astype(float)
    m, lo, hi = st.mean_interval(x, num_resamples=4000)
    assert m == pytest.approx(x.mean())
    half = 1.96 * x.std() / np.sqrt(len(x))  # second way: the normal interval of a mean
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < m < hi


def test_seeds_are_nested_in_tasks():
    rng = np.random.default_rng(2)
    per_task = rng.normal(size=(30, 1))
    repeated = np.repeat(per_task, 3, axis=1)  # a deterministic agent: the same value on every seed
    assert st.mean_interval(repeated, 500) == pytest.approx(st.mean_interval(per_task, 500))


def test_missing_cells_are_left_out():
    x = np.array([[1.0, np.nan], [0.0, 0.0], [np.nan, np.nan]])
    m, lo, hi = st.mean_interval(x, 200)
    assert m == pytest.approx(1 / 3) and 0 <= lo <= hi <= 1
    assert all(math.isnan(v) for v in st.mean_interval(np.full((3, 2), np.nan)))


def test_deterministic_given_the_seed():
    x = np.random.default_rng(3).random((2, 8, 2))
    assert st.mean_interval(x, 300, seed=5) == st.mean_interval(x, 300, seed=5)
    assert st.mean_interval(x, 300, seed=5) != st.mean_interval(x, 300, seed=6)


# ------------------------------------------------------------------------------------ several runs
def test_two_disagreeing_runs_widen_the_interval():
    # run 0 succeeds on every task, run 1 on none: a resample's mean is the share of its two run draws
    # that are run 0: 0, 1/2, 1 with P = 1/4, 1/2, 1/4, so the interval is [0, 1]. Averaging the runs
    # first leaves 0.5 on every task, an interval of [0.5, 0.5]: the runs' spread would be lost.
    runs = np.array([[[1.0], [1.0], [1.0]], [[0.0], [0.0], [0.0]]])  # (runs, tasks, seeds)
    assert tuple(st.mean_interval(runs, 2000)) == (0.5, 0.0, 1.0)
    assert tuple(st.mean_interval(runs.mean(axis=0), 2000)) == (0.5, 0.5, 0.5)


def test_two_runs_three_tasks_by_hand():
    # run 0: tasks [1, 1, 0]; run 1: [0, 0, 0]. Each of the two run draws adds 0 with P 1/2 + 1/2 (1/3)^3
    # = 14/27, so P(mean 0) = (14/27)^2 = 196/729 > 2.5%: low = 0. P(mean 1) = 1/4 (2/3)^6 = 16/729 < 2.5%
    # and P(mean >= 5/6) = 1/4 (6 (2/3)^5 (1/3) + (2/3)^6) = 64/729 > 2.5%: high = 5/6.
    runs = np.array([[[1.0], [1.0], [0.0]], [[0.0], [0.0], [0.0]]])
    m, lo, hi = st.mean_interval(runs, 20000)
    assert (m, lo, hi) == (pytest.approx(1 / 3), 0.0, pytest.approx(5 / 6))
    # the runs averaged per task, [1/2, 1/2, 0], tasks only: means 0, 1/6, 1/3, 1/2 with P 1, 6, 12, 8 (/27)
    assert tuple(st.mean_interval(runs.mean(axis=0), 20000)) == (pytest.approx(1 / 3), 0.0, 0.5)
    # second way: the whole bootstrap distribution enumerated (2 run draws x 3 task draws each)
    exact = {}
    for r in itertools.product(range(2), repeat=2):
        for t in itertools.product(range(3), repeat=6):
            mean = round(sum(runs[r[i // 3], t[i], 0] for i in range(6)) / 6, 9)
            exact[mean] = exact.get(mean, 0) + 1 / (4 * 3**6)
    assert exact[0.0] == pytest.approx(196 / 729) and exact[1.0] == pytest.approx(16 / 729)
    draws = np.round(st.resample(runs, 20000).mean(axis=(1, 2, 3)), 9)
    for mean, p in exact.items():
        assert np.mean(draws == mean) == pytest.approx(p, abs=0.01)


def test_tasks_are_drawn_within_each_drawn_run():
    values = (10 * np.arange(3)[:, None] + np.arange(4)[None, :])[..., None].astype(float)  # run r, task t: 10r + t
    draws = st.resample(values, 500)  # (R, runs, tasks, seeds)
    run_of = draws // 10
    assert np.all(run_of == run_of[:, :, :1])  # every task of a slot comes from the slot's run
    assert len(np.unique(run_of[:, :, 0])) == 3  # and the slots' runs are drawn


def test_paired_difference_cancels_what_the_pair_shares():
    rng = np.random.default_rng(4)
    b = rng.random((2, 10, 2))  # tasks differ a lot
    assert tuple(st.difference_interval(b + 0.25, b, 500)) == pytest.approx((0.25, 0.25, 0.25))
    # run i of A pairs with run i of B: A = (c + 0.5, c), B = (c, c + 0.5) differ by +0.5 in run 0 and -0.5 in
    # run 1, so a resample's mean is +0.5, 0, -0.5 with P 1/4, 1/2, 1/4: [-0.5, +0.5]; B in A's order: 0
    c = b[0]
    a, b = np.stack([c + 0.5, c]), np.stack([c, c + 0.5])
    assert tuple(st.difference_interval(a, b, 2000)) == pytest.approx((0.0, -0.5, 0.5))
    assert tuple(st.difference_interval(a, b[::-1], 2000)) == pytest.approx((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="one shape"):
        st.difference_interval(b, b[:1])


# ------------------------------------------------------------------------------------------- IQM
def test_interquartile_mean_of_known_vectors():
    assert st.interquartile_mean(np.arange(1, 9)) == 4.5  # 3, 4, 5, 6
    assert st.interquartile_mean([0, 0, 0, 0, 1, 1, 1, 1, 10, 100]) == pytest.approx(4 / 6)  # 2 cut off each end
    assert st.interquartile_mean([np.nan, 8, 1, 2, 3, 4, 5, 6, 7]) == 4.5  # NaN left out
    assert math.isnan(st.interquartile_mean([np.nan]))
    x = np.random.default_rng(5).random(37)
    assert st.interquartile_mean(x) == pytest.approx(trim_mean(x, 0.25))  # rliable's definition


def test_iqm_interval_averages_seeds_then_trims_run_task_scores():
    # one run, 8 tasks, 2 seeds: task scores (seeds averaged) 0, 1, 1, 1, 1, 1, 1, 100 -> IQM 1, mean 13.25
    scores = np.array([0, 1, 1, 1, 1, 1, 1, 100], dtype=float)
    x = np.stack([scores - 0.5, scores + 0.5], axis=1)
    m, lo, hi = st.iqm_interval(x, 500)
    assert m == 1.0 and st.mean_interval(x, 500).estimate == pytest.approx(13.25)
    assert lo <= 1.0 <= hi
    runs = np.stack([x, x + 2])  # two runs: 16 (run, task) scores, IQM of the middle 8
    assert st.iqm_interval(runs, 200).estimate == pytest.approx(trim_mean(np.r_[scores, scores + 2], 0.25))


# ------------------------------------------------------------------------------------ sign test
def test_sign_test_against_hand_computed_binomial_tails():
    assert st.sign_test(9, 2) == pytest.approx(2 * (55 + 11 + 1) / 2**11)  # 0.0654
    assert st.sign_test(2, 9) == st.sign_test(9, 2)
    assert st.sign_test(5, 5) == 1.0 and st.sign_test(0, 0) == 1.0
    assert st.sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert st.sign_test(3, 1) == pytest.approx(2 * (1 + 4) / 16)  # 0.625


def test_won_lost_averages_runs_and_seeds_within_a_task():
    nan = np.nan
    diff = np.array([  # (runs, tasks, seeds)
        [[1, 0], [-1, 0], [nan, nan], [nan, nan]],
        [[0, 0], [0, 1], [-1, nan], [nan, nan]],
    ])
    # task 0: mean 0.25, won; task 1: 0, a tie; task 2: -1, lost; task 3: no record
    assert st.won_lost(diff) == (1, 1, 3, 1.0)
    assert st.won_lost(diff[0]) == (1, 1, 2, 1.0)  # run 0 alone: task 0 won, task 1 lost, task 2 unrecorded
    assert st.won_lost(np.ones((9, 1))) == (9, 0, 9, pytest.approx(2 / 2**9))


# --------------------------------------------------------------------- normal and t intervals
def test_normal_interval_by_hand():
    mean, half = st.normal_interval(np.array([1.0, 2.0, 3.0]))
    assert mean == 2.0 and half == pytest.approx(1.96 / math.sqrt(3))
    mean, half = st.normal_interval(np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]))  # per row
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(half, [1.96 / math.sqrt(3), 0.0])
    assert math.isnan(st.normal_interval(np.array([5.0]))[1])


def test_t_interval_by_hand():
    mean, half = st.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)  # t(0.975, 2 df) x sd / sqrt(n)
    assert math.isnan(st.t_interval([5.0])[1])


def test_scores_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="shape"):
        st.mean_interval(np.zeros(4))
