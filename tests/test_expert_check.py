"""study/expert_check.py, ``icl-metarl suites NAME --check N``: the expert (told the goal) and random on N tasks
of every environment, through the evaluator."""

import json

from icl_metarl.study import cli
from icl_metarl.study.expert_check import kept_up_to, steps_to_success


def test_check_plays_every_environment_and_split_and_writes_each_evaluation(tmp_path, capsys):
    argv = ["suites", "ML1:reach-v3", "--check", "2", "--split", "train", "test", "--episode-length", "150",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| 1 |")]
    assert [r.split(" | ")[1:4] for r in rows] == [["train", "reach-v3", "2"], ["test", "reach-v3", "2"]]
    expert, random = float(rows[1].split(" | ")[4]), float(rows[1].split(" | ")[-1].rstrip(" |"))
    assert expert == 1.0 and random == 0.0  # reach's expert finishes within 150 steps; random does not
    for split in ("train", "test"):
        results = json.loads((tmp_path / split / "results.json").read_text())
        assert list(results["agents"]) == ["oracle", "random"] and results["settings"]["split"] == split
    assert "env steps/s" not in out and "env steps/s" in err  # the tables alone on stdout
    assert cli.main(argv) == 0  # resumed from --out: the same table
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")] == rows


def test_several_decision_intervals_give_a_table_relative_to_the_first(tmp_path, capsys):
    assert cli.main(["suites", "ML1:reach-v3", "--check", "1", "--episode-length", "150", "--action-repeats", "1", "2",
                     "--no-random", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| test | reach-v3 |" in out and "kept (>= 0.95 of k=1) up to" in out and "random" not in out
    for k in (1, 2):  # the expert alone: the layout of results/expert-ml10-k, whose table.md the command reprints
        assert list(json.loads((tmp_path / f"k{k}" / "test" / "results.json").read_text())["agents"]) == ["oracle"]


def test_kept_up_to_stops_at_the_first_k_that_loses_success():
    assert kept_up_to({1: 1.0, 2: 1.0, 3: 0.5, 4: 1.0}, (1, 2, 3, 4), 0.95) == 2
    assert kept_up_to({1: 0.8, 2: 0.78, 3: 0.7}, (1, 2, 3), 0.95) == 2
    assert kept_up_to({1: 0.0, 2: 0.0}, (1, 2), 0.95) == 2


def test_steps_to_success_counts_successful_episodes_only():
    recs = [{"success": True, "steps_to_success": s} for s in (10, 20, 30)] + [{"success": False, "steps_to_success": None}]
    assert steps_to_success(recs) == "20 | 28 | 30"
    assert steps_to_success(recs[3:]) == "- | - | -"


def test_a_check_without_a_suite_is_a_one_line_error(capsys):
    assert cli.main(["suites", "--check", "2"]) == 2
    assert "--check plays one suite" in capsys.readouterr().err


def test_the_expert_is_told_the_goal_offsets_given(tmp_path, capsys):
    argv = ["suites", "ML1:reach-v3", "--check", "1", "--split", "train", "--episode-length", "60", "--no-random",
            "--expert-goal-offsets", "reach-v3=0,0,0.045", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    oracle = json.loads((tmp_path / "train" / "results.json").read_text())["agents"]["oracle"]
    assert oracle["description"]["expert_goal_offsets"] == ["reach-v3=0,0,0.045"]
    capsys.readouterr()
    assert cli.main(["suites", "ML1:reach-v3", "--check", "1", "--expert-goal-offsets", "push-v3=0,0,0.045"]) == 2
    assert "not an environment of suite ML1:reach-v3" in capsys.readouterr().err
