"""Pooling few-shot evaluations and probes over training seeds: the means and seed intervals are the
seeds' own figures, a pool of two test sets is refused, and the command writes its report."""

import json
import math

import pytest
import torch

from icl_metarl.fewshot.config import FewShotProbeConfig
from icl_metarl.fewshot.evaluation import FunctionPredictor, MismatchError, make_test_set, score
from icl_metarl.fewshot.model import LinearSelfAttention
from icl_metarl.fewshot.pool import pool_evaluations, pool_probes
from icl_metarl.fewshot.probe import linear_reference, probe_predictor
from icl_metarl.harness.files import atomic_write_json
from icl_metarl.harness.regression_tasks import LINEAR, MAML_SINE
from icl_metarl.harness.statistics import t_interval
from icl_metarl.study.cli import main

torch.set_num_threads(1)


def _results(scale, test_seed=0, diverge=False, learners=("shrunk", "zero")):
    """The results.json of one 'training seed': a learner predicting scale x the support mean, and zero."""
    test = make_test_set(MAML_SINE, n_tasks=6, max_shots=5, n_query=4, seed=test_seed)

    def shrunk(sx, sy, qx):
        out = scale * sy.mean(1).expand(-1, qx.shape[1]).clone()
        if diverge:
            out[0] = float("inf")
        return out

    fns = {"shrunk": shrunk, "zero": lambda sx, sy, qx: torch.zeros(qx.shape[:2])}
    records = score([FunctionPredictor(n, fns[n]) for n in learners], test, shots=(1, 5))
    return {"run": f"r{scale}", "trained_on": "maml-sine", "families": ["maml-sine"],
            "training_shots": {"gradient": 5, "in-context": 5}, "budgets": {"shrunk": {}, "zero": {}},
            "settings": {"tasks": 6, "queries": 4, "seed": test_seed, "shots": [1, 5], "gradient_steps": [1]},
            "records": records, "versions": {}}


def test_pooled_evaluation_is_the_mean_of_the_seeds_figures():
    runs = [_results(s) for s in (0.5, 0.8, 1.0)]
    pooled = pool_evaluations(runs, ["s0", "s1", "s2"])
    for row in pooled["rows"]:
        per_seed = [next(r["mse"] for r in run["records"] if r["learner"] == row["learner"]
                         and r["shots"] == row["shots"]) for run in runs]
        assert row["per_seed"] == per_seed
        assert (row["mean"], row["ci95"]) == t_interval(per_seed)
    zero = [row for row in pooled["rows"] if row["learner"] == "zero"]
    assert all(row["ci95"] == 0 for row in zero)  # the same predictions in every seed: no spread
    shrunk = [row for row in pooled["rows"] if row["learner"] == "shrunk"]
    assert all(row["ci95"] > 0 for row in shrunk)


def test_pool_refuses_other_test_sets_missing_learners_and_reports_divergence():
    with pytest.raises(MismatchError, match="evaluated with settings"):
        pool_evaluations([_results(0.5), _results(0.8, test_seed=1)], ["a", "b"])
    other_points = _results(0.8, test_seed=1)
    other_points["settings"] = _results(0.5)["settings"]  # settings that lie: the fingerprints still differ
    with pytest.raises(MismatchError, match="different points"):
        pool_evaluations([_results(0.5), other_points], ["a", "b"])
    with pytest.raises(MismatchError, match="missing from 1"):
        pool_evaluations([_results(0.5), _results(0.8, learners=("zero",))], ["a", "b"])
    pooled = pool_evaluations([_results(0.5), _results(0.8, diverge=True)], ["a", "b"])
    row = next(r for r in pooled["rows"] if r["learner"] == "shrunk")
    assert row["diverged_tasks"] == [0, 1] and math.isnan(row["mean"])


def test_pool_command_writes_evaluation_and_probe_reports(tmp_path, capsys):
    dirs = []
    for i, scale in enumerate((0.5, 0.8)):
        d = tmp_path / f"eval-s{i}"
        atomic_write_json(d / "results.json", _results(scale))
        dirs.append(str(d))
    assert main(["fewshot", "pool", *dirs, "--out", str(tmp_path / "pooled")]) == 0
    report = (tmp_path / "pooled" / "pooled.md").read_text()
    assert "pooled over 2 training seeds" in report and "| shrunk |" in report
    assert (tmp_path / "pooled" / "pooled-mse-maml-sine.png").stat().st_size > 1000
    shifted = [_results(scale) for scale in (0.5, 0.8)]  # a second family: the same tasks, relabelled
    for i, r in enumerate(shifted):
        r["families"] = ["maml-sine", "maml-sine-noisy"]
        r["records"] += [dict(rec, family="maml-sine-noisy", mse=2 * rec["mse"]) for rec in r["records"]]
        atomic_write_json(tmp_path / f"ood-s{i}" / "results.json", r)
    assert main(["fewshot", "pool", *(str(tmp_path / f"ood-s{i}") for i in (0, 1)), "--out",
                 str(tmp_path / "ood")]) == 0
    assert "| zero | 2 (2, 2) |" in (tmp_path / "ood" / "pooled.md").read_text()  # twice the error in each seed
    config = FewShotProbeConfig(shots=(3,), tasks=4, queries=3, gd_steps=(1, 2), step_sizes=(0.3, 1.0))
    probes = []
    for i, lr in enumerate((0.3, 1.0)):  # two 'seeds': one-step layers with different step sizes
        metrics = probe_predictor(LinearSelfAttention.gradient_step(LINEAR.dim, lr).predict, LINEAR,
                                  linear_reference(LINEAR.dim), config)
        atomic_write_json(tmp_path / f"probe-s{i}" / "metrics.json", metrics)
        probes.append(str(tmp_path / f"probe-s{i}"))
    assert main(["fewshot", "pool", *probes, "--out", str(tmp_path / "pooled-probe")]) == 0
    pooled = json.loads((tmp_path / "pooled-probe" / "pooled.json").read_text())
    assert pooled["rows"][0]["best_k"] == [1, 1]
    assert pooled["rows"][0]["relative_error"]["mean"] < 1e-10
    # mixing kinds, or pooling one directory, is a one-line error
    capsys.readouterr()
    assert main(["fewshot", "pool", dirs[0], probes[0], "--out", str(tmp_path / "x")]) == 2
    assert "mixes evaluations" in capsys.readouterr().err
    assert main(["fewshot", "pool", dirs[0], "--out", str(tmp_path / "x")]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_pool_of_probes_refuses_other_settings():
    config = FewShotProbeConfig(shots=(3,), tasks=4, queries=3, gd_steps=(1,), step_sizes=(1.0,))
    a = probe_predictor(LinearSelfAttention.gradient_step(LINEAR.dim, 0.3).predict, LINEAR,
                        linear_reference(LINEAR.dim), config)
    b = dict(a, settings=dict(a["settings"], seed=a["settings"]["seed"] + 1))
    with pytest.raises(MismatchError, match="probed with settings"):
        pool_probes([a, b], ["a", "b"])
