"""scripts/stage_costs.py: each stage's cost is its cumulative budget minus the previous stage's, and the
projection scales each stage by its own unit."""

import json

import pytest
from _scripts import load_script

from icl_metarl.harness.budget import Budget, write_budget


def _manifest(path, trials, cpu_seconds):
    path.mkdir(parents=True)
    settings = {"trials": trials, "episodes_per_trial": 4, "episode_length": 500, "action_repeat": 3, "seed": 0}
    shards = {"shard-0": {"steps": trials * 4 * 167, "cpu_seconds": cpu_seconds}}
    (path / "manifest.json").write_text(json.dumps({"settings": settings, "shards": shards}))


def _study(root):
    _manifest(root / "histories", trials=10, cpu_seconds=120.0)  # 2 CPU-min
    write_budget(root / "pretrain-norm", Budget(optimizer_steps=30, train_cpu_minutes=3.0, data_cpu_minutes=2.0))
    for r in (1, 2):
        _manifest(root / "icl" / f"round-{r}" / "relabelled", trials=2, cpu_seconds=30.0)
    write_budget(root / "icl", Budget(optimizer_steps=50, train_cpu_minutes=5.0, data_cpu_minutes=3.0))
    write_budget(root / "maml-imitate", Budget(env_steps=20_000, optimizer_steps=10, train_cpu_minutes=4.0))
    return root


def test_stages_are_differences_of_cumulative_budgets(tmp_path):
    costs = load_script("stage_costs")
    rows = costs.stages(_study(tmp_path))
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (pytest.approx(2.0), 10, "trials"), (3.0, 30, "pretrain steps"), (pytest.approx(1.0), 4, "relabelled"),
        (2.0, 20, "stage steps"), (4.0, 20_000, "maml env steps")]
    full = costs.project(rows, envs=10)
    # 1,000 trials at 0.2 CPU-min each; 1,500 steps at 0.1; 800 relabelled at 0.25; 1,000 steps at 0.1;
    # 5.2M maml env steps at 4 CPU-min per 20,000
    assert [f[0] for f in full] == [1000, 1500, 800, 1000, 5_200_000]
    assert [f[1] for f in full] == pytest.approx([200.0, 150.0, 200.0, 100.0, 1040.0])


def test_a_directory_that_is_not_a_study_is_one_line(tmp_path):
    costs = load_script("stage_costs")
    with pytest.raises(SystemExit, match="no histories/manifest.json"):
        costs.stages(tmp_path)
