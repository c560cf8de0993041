"""``icl-metarl compare`` (harness/comparison.py): replicate runs of two learners read from evaluations of
one protocol, against figures computed by hand from the arrays the records were made of."""

import json

import numpy as np
import pytest

from icl_metarl.harness import statistics as st
from icl_metarl.study.cli import main


def _results(success: dict, adaptive: dict | None = None, spec: dict | None = None, split: str = "test",
             tasks: list | None = None, evaluation: int = 1) -> dict:
    """A results.json of hand-made success arrays (episodes, tasks, seeds) per agent label; the last
    ``evaluation`` episodes are evaluation episodes."""
    e, t, s = next(iter(success.values())).shape
    records = [{"agent": a, "seed": seed, "task": j, "episode": k, "success": bool(x[k, j, seed]), "return": 0.0,
                "steps_to_success": None}
               for a, x in success.items() for k in range(e) for j in range(t) for seed in range(s)]
    return {"format": "icl_metarl.evaluation/1",
            "settings": {"suite": "ML1:reach-v3", "split": split, "adaptation_episodes": e - evaluation,
                         "evaluation_episodes": evaluation},
            "tasks": tasks if tasks is not None else [{"index": j} for j in range(t)], "seeds": list(range(s)),
            "records": records,
            "agents": {a: {"spec": (spec or {}).get(a, a), "adaptive": (adaptive or {}).get(a, True)} for a in success}}


def _write(path, results: dict):
    path.mkdir()
    (path / "results.json").write_text(json.dumps(results))
    return path


def _compare(capsys, *args) -> tuple[int, str, str]:
    rc = main(["compare", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _row(out: str, side: str) -> list[str]:
    """A learner's table cells, its runs' names left out (they name the directories when there are several)."""
    cells = next(line for line in out.splitlines() if line.startswith(f"| {side} |")).split("|")
    return cells[3:-1]


def _difference(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("A - B"))


def test_pooled_figures_against_hand_computed_means(tmp_path, capsys):
    rng = np.random.default_rng(0)
    success = {f"a{i}": (rng.random((2, 6, 2)) < 0.7).astype(float) for i in range(2)}
    success |= {f"b{i}": (rng.random((2, 6, 2)) < 0.2).astype(float) for i in range(2)}
    _write(tmp_path / "r", _results(success))
    rc, out, err = _compare(capsys, tmp_path / "r", "--a", "a0", "a1", "--b", "b0", "b1", "--episode", 2,
                            "--bootstrap", 300)
    assert rc == 0, err
    xa = np.stack([success["a0"][1], success["a1"][1]])  # (runs, tasks, seeds): episode 2
    xb = np.stack([success["b0"][1], success["b1"][1]])
    assert f"| {xa[0].mean():.2f}, {xa[1].mean():.2f} |" in out  # each run's mean
    want = xa.mean() - xb.mean()
    assert f"A - B {want:+.2f} [" in out
    d = st.difference_interval(xa, xb, 300)  # second way: the module on the arrays themselves
    assert f"A - B {d.estimate:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" in out
    m, q = st.mean_interval(xa, 300), st.iqm_interval(xa, 300)
    assert _row(out, "A")[1:] == [f" {m.estimate:.2f} [{m.low:.2f}, {m.high:.2f}] ",
                                  f" {q.estimate:.2f} [{q.low:.2f}, {q.high:.2f}] "]
    per_task = (xa - xb).mean(axis=(0, 2))  # runs and seeds averaged
    won, lost = int((per_task > 0).sum()), int((per_task < 0).sum())
    assert f"tasks won {won}, lost {lost} of 6" in out and f"sign test p {st.sign_test(won, lost):.3g}" in out


def test_disagreeing_runs_give_the_hierarchical_interval(tmp_path, capsys):
    # A's run 0 succeeds on every task, its run 1 on none; B never succeeds. A resample's mean is the share of
    # its run draws that are run 0: 0, 1/2, 1 with P 1/4, 1/2, 1/4, so the interval is [0, 1]; averaging
    # the runs first would have given [0.5, 0.5].
    ones, zeros = np.ones((2, 5, 1)), np.zeros((2, 5, 1))
    _write(tmp_path / "r", _results({"a0": ones, "a1": zeros, "b0": zeros, "b1": zeros}))
    rc, out, err = _compare(capsys, tmp_path / "r", "--a", "a0", "a1", "--b", "b0", "b1", "--episode", 2)
    assert rc == 0, err
    assert _row(out, "A")[1] == " 0.50 [0.00, 1.00] "
    assert "A - B +0.50 [+0.00, +1.00]; tasks won 5, lost 0 of 5" in out


def test_agents_of_several_evaluations_pair_task_by_task(tmp_path, capsys):
    rng = np.random.default_rng(1)
    success = {name: (rng.random((2, 5, 2)) < p).astype(float)
               for name, p in (("a0", 0.7), ("a1", 0.6), ("b0", 0.3), ("b1", 0.4))}
    one = _write(tmp_path / "one", _results(success))
    left = _write(tmp_path / "left", _results({k: success[k] for k in ("a0", "b0", "b1")}))
    right = _write(tmp_path / "right", _results({"a1": success["a1"]}))

    args = ("--a", "a0", "a1", "--b", "b0", "b1", "--episode", 2)
    rc, together, _ = _compare(capsys, one, *args)
    rc2, apart, err = _compare(capsys, left, right, *args)
    assert rc == rc2 == 0, err
    # the same pooled figures whether the agents were played together or not
    assert _row(together, "A") == _row(apart, "A") and _row(together, "B") == _row(apart, "B")
    assert _difference(together) == _difference(apart)
    assert f"{left}:a0, {right}:a1" in apart

    # a label in two evaluations must be named by its directory; then it resolves
    rc, _, err = _compare(capsys, one, left, "--a", "a0", "--b", "b0", "--episode", 2)
    assert rc == 2 and "RESULTS_DIR:LABEL" in err and len(err.strip().splitlines()) == 1
    rc, named, err = _compare(capsys, one, left, "--a", f"{left}:a0", "--b", f"{one}/:b0", "--episode", 2)
    assert rc == 0, err
    _, alone, _ = _compare(capsys, one, "--a", "a0", "--b", "b0", "--episode", 2)
    assert _difference(named) == _difference(alone)
    # one evaluation named twice is one evaluation, not a label in two
    rc, twice, err = _compare(capsys, one, f"{one}/", "--a", "a0", "--b", "b0", "--episode", 2)
    assert rc == 0, err
    assert _difference(twice) == _difference(alone)

    # another split or other tasks do not pair: refused in one line
    other = _write(tmp_path / "other", _results({"c": success["b0"]}, split="validation"))
    rc, _, err = _compare(capsys, left, other, "--a", "a0", "--b", "c", "--episode", 2)
    assert rc == 2 and "split='validation'" in err and len(err.strip().splitlines()) == 1
    (other / "results.json").write_text(json.dumps(_results({"c": success["b0"]},
                                                            tasks=[{"index": j} for j in range(5)][::-1])))
    rc, _, err = _compare(capsys, left, other, "--a", "a0", "--b", "c", "--episode", 2)
    assert rc == 2 and "different tasks" in err


def test_against_non_adaptive_pairs_each_run_with_its_own_variant(tmp_path, capsys):
    rng = np.random.default_rng(2)
    runs = [((rng.random((4, 40, 2)) < 0.7).astype(float), (rng.random((4, 40, 2)) < 0.4).astype(float))
            for _ in range(2)]
    for i, (icl, wiped) in enumerate(runs):
        _write(tmp_path / f"r{i}", _results({"icl": icl, "icl [non-adaptive]": wiped},
                                            adaptive={"icl [non-adaptive]": False},
                                            spec={"icl": f"run{i}", "icl [non-adaptive]": f"run{i}"}))
    rc, out, err = _compare(capsys, tmp_path / "r0", tmp_path / "r1", "--a", f"{tmp_path / 'r0'}:icl",
                            f"{tmp_path / 'r1'}:icl", "--against-non-adaptive", "--episode", 3, "--bootstrap", 200)
    assert rc == 0, err
    assert "(the last adaptation episode)" in out
    assert f"{tmp_path / 'r1'}:icl [non-adaptive]" in out
    diff = np.mean([icl[2].mean() - wiped[2].mean() for icl, wiped in runs])
    per_task = np.mean([(icl[2] - wiped[2]).mean(1) for icl, wiped in runs], axis=0)
    assert f"A - B {diff:+.2f} [" in out
    assert f"tasks won {(per_task > 0).sum()}, lost {(per_task < 0).sum()} of 40" in out

    rc, _, err = _compare(capsys, tmp_path / "r0", "--a", "icl [non-adaptive]", "--against-non-adaptive",
                          "--episode", 3)
    assert rc == 2 and "not an adaptive agent" in err


def test_evaluation_is_each_trials_mean_over_its_evaluation_episodes(tmp_path, capsys):
    rng = np.random.default_rng(1)
    # 2 adaptation + 3 evaluation episodes; the mean over episodes 3-5 differs from any one of them
    success = {a: (rng.random((5, 8, 2)) < p).astype(float) for a, p in (("a0", 0.7), ("b0", 0.3))}
    _write(tmp_path / "r", _results(success, evaluation=3))
    rc, out, err = _compare(capsys, tmp_path / "r", "--a", "a0", "--b", "b0", "--episode", "evaluation",
                            "--bootstrap", 300)
    assert rc == 0, err
    xa, xb = success["a0"][2:].mean(axis=0)[None], success["b0"][2:].mean(axis=0)[None]  # (runs, tasks, seeds)
    d = st.difference_interval(xa, xb, 300)
    assert f"A - B {d.estimate:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" in out
    assert "the evaluation episodes 3-5 (each trial's mean)" in out
    rc, last, _ = _compare(capsys, tmp_path / "r", "--a", "a0", "--b", "b0", "--episode", 5, "--bootstrap", 300)
    assert _difference(last) != _difference(out)  # not the last episode alone


@pytest.mark.parametrize("args, fragment", [
    (["--a", "zz", "--b", "b0", "--episode", "2"], "no agent 'zz' in the results; valid: a0, a1, b0"),
    (["--a", "a0", "a1", "--b", "b0", "--episode", "2"], "--a has 2 runs and --b 1"),
    (["--a", "a0", "a0", "--b", "b0", "a1", "--episode", "2"], "a0 more than once"),
    (["--a", "a0", "--episode", "2"], "--b LABEL ... or --against-non-adaptive"),
    (["--a", "a0", "--b", "b0", "--against-non-adaptive", "--episode", "2"], "not both"),
    (["--a", "a0", "--b", "b0", "--episode", "3"], "--episode 3: allowed 1..2 or 'evaluation' or 'replay-best'"),
    (["--a", "a0", "--b", "b0", "--episode", "last"], "--episode last: allowed 1..2 or 'evaluation' or 'replay-best'"),
    (["--a", "a0", "--b", "b0", "--episode", "1", "--bootstrap", "0"], "--bootstrap must be >= 1, got 0"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, fragment):
    x = np.ones((2, 3, 1))
    r = _write(tmp_path / "r", _results({"a0": x, "a1": x, "b0": x}))
    rc, _, err = _compare(capsys, r, *args)
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_evaluation_is_one_line(tmp_path, capsys):
    rc, _, err = _compare(capsys, tmp_path / "missing", "--a", "a", "--b", "b", "--episode", 1)
    assert rc == 2 and "no results file" in err and "missing" in err


def test_per_env_rows_pool_each_environments_tasks_alone(tmp_path, capsys):
    """Two environments of 3 tasks each: each row is the module's figures on that environment's columns."""
    rng = np.random.default_rng(3)
    success = {name: (rng.random((2, 6, 2)) < p).astype(float)
               for name, p in (("a0", 0.8), ("a1", 0.5), ("b0", 0.3), ("b1", 0.2))}
    success["a1"][:, 3:] = 0.0  # lever-pull is harder for A's run 1
    tasks = [{"index": j, "env_name": "door-close-v3" if j < 3 else "lever-pull-v3"} for j in range(6)]
    _write(tmp_path / "r", _results(success, tasks=tasks))
    rc, out, err = _compare(capsys, tmp_path / "r", "--a", "a0", "a1", "--b", "b0", "b1", "--episode", 2,
                            "--bootstrap", 200, "--per-env")
    assert rc == 0, err
    xa = np.stack([success["a0"][1], success["a1"][1]])
    xb = np.stack([success["b0"][1], success["b1"][1]])
    for env, cols in (("door-close-v3", slice(0, 3)), ("lever-pull-v3", slice(3, 6))):
        m, d = st.mean_interval(xa[:, cols], 200), st.difference_interval(xa[:, cols], xb[:, cols], 200)
        per_task = (xa[:, cols] - xb[:, cols]).mean(axis=(0, 2))
        row = next(line for line in out.splitlines() if line.startswith(f"| {env} |"))
        assert row.startswith(f"| {env} | 3 | {m.estimate:.2f} [{m.low:.2f}, {m.high:.2f}] |")
        assert f"| {d.estimate:+.2f} [{d.low:+.2f}, {d.high:+.2f}] | {(per_task > 0).sum()} / {(per_task < 0).sum()} |" in row
    assert abs(xa[:, :3].mean() - xa[:, 3:].mean()) > 0.01  # the rows differ, so a whole-table row would fail
    rc, out, _ = _compare(capsys, tmp_path / "r", "--a", "a0", "--b", "b0", "--episode", 2, "--bootstrap", 50)
    assert rc == 0 and "| door-close-v3 |" not in out  # only with --per-env


def test_replay_best_is_the_success_of_each_trials_highest_return_adaptation_episode(tmp_path, capsys):
    """Three adaptation episodes and one evaluation episode; the return picks the episode, not the success."""
    rng = np.random.default_rng(5)
    success = {a: (rng.random((4, 6, 2)) < 0.5).astype(float) for a in ("a0", "b0")}
    returns = {a: rng.random((4, 6, 2)) for a in success}
    results = _results(success)
    for r in results["records"]:
        r["return"] = float(returns[r["agent"]][r["episode"], r["task"], r["seed"]])
    _write(tmp_path / "r", results)
    rc, out, err = _compare(capsys, tmp_path / "r", "--a", "a0", "--b", "b0", "--episode", "replay-best",
                            "--bootstrap", 200)
    assert rc == 0, err
    by_hand = {}
    for a in success:
        x = np.empty((6, 2))
        for j in range(6):
            for seed in range(2):
                best = max(range(3), key=lambda k: returns[a][k, j, seed])  # the adaptation episodes only
                x[j, seed] = success[a][best, j, seed]
        by_hand[a] = x[None]
    d = st.difference_interval(by_hand["a0"], by_hand["b0"], 200)
    assert f"A - B {d.estimate:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" in out
    assert "highest-return adaptation episode (1-3)" in out
    any_success = np.nanmax(success["a0"][:3], axis=0)[None]  # the 'found' rate, a different figure
    assert not np.isclose(by_hand["a0"].mean(), any_success.mean())
