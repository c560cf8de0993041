"""scripts/train_until_stopped.py: train a gradient learner in chunks until its validation curve stops rising."""

import json

import pytest
from _scripts import load_script

TRAIN = ["reptile", "--suite", "ML1:reach-v3", "--task-pool", "fresh", "--episode-length", "10", "--meta-batch", "2",
         "--hidden", "4", "--ppo-epochs", "1", "--checkpoint-every", "1", "--seed", "3"]
EVAL = ["--suite", "ML1:reach-v3", "--episode-length", "10", "-K", "1", "-E", "1", "--tasks", "2"]


def _fake_success(monkeypatch, driver, values):
    """Make the validation figure of the point at iteration i be values[i - 1] (playing nothing): the loop's
    stopping is then checked against a curve the test chooses, while the training it drives is real."""
    bc = driver._budget_curves()

    def evaluate(agents, config, out):
        return {"fake": int(str(out).rsplit("-", 1)[1])}

    def adaptation_summary(results):
        v = values[results["fake"] - 1]
        return [{"adaptive": True, "agent": "reptile", "first": (0.0, 0.0, 0.0), "last": (v, v, v)}]

    monkeypatch.setattr(bc, "load_agents", lambda *a, **k: None)
    monkeypatch.setattr(bc, "evaluate", evaluate)
    monkeypatch.setattr(bc, "adaptation_summary", adaptation_summary)
    monkeypatch.setattr(driver, "_budget_curves", lambda: bc)


def test_stops_two_points_after_the_best_and_resumes_without_training(tmp_path, monkeypatch, capsys):
    driver = load_script("train_until_stopped")
    _fake_success(monkeypatch, driver, [0.1, 0.3, 0.2, 0.3, 0.9, 0.9])
    run, curves = tmp_path / "run", tmp_path / "curves"
    argv = ["--every", "1", "--max-iterations", "6", *EVAL, "--out", str(curves), "--", *TRAIN, "--out", str(run)]
    assert driver.main(argv) == 0
    # best 0.3 at iteration 2 (the tie at 4 goes to the earlier point); 3 and 4 do not beat it: stop at 4
    assert json.loads((run / "config.json").read_text())["iteration"] == 4
    data = json.loads((curves / "curves.json").read_text())
    assert [p["point"] for p in data["points"]] == [f"iteration-00000{i}" for i in (1, 2, 3, 4)]
    assert data["chosen"][str(run)]["point"] == "iteration-000002"
    assert "stopped improving at iteration 4; play iteration-000002 on test" in capsys.readouterr().out

    monkeypatch.setattr(driver.cli, "main", lambda argv: pytest.fail("a stopped run was trained again"))
    assert driver.main(argv) == 0


def test_min_iterations_trains_on_past_an_early_stop(tmp_path, monkeypatch, capsys):
    driver = load_script("train_until_stopped")
    _fake_success(monkeypatch, driver, [0.3, 0.1, 0.1, 0.2, 0.2])
    run = tmp_path / "run"
    argv = ["--every", "1", "--max-iterations", "9", "--min-iterations", "5", *EVAL, "--out", str(tmp_path / "c"),
            "--", *TRAIN, "--out", str(run)]
    assert driver.main(argv) == 0  # stopped by the rule at 3, trained on to 5, best still the first point
    assert json.loads((run / "config.json").read_text())["iteration"] == 5
    assert "stopped improving at iteration 5; play iteration-000001" in capsys.readouterr().out


def test_the_cap_comes_first_and_says_so(tmp_path, monkeypatch, capsys):
    driver = load_script("train_until_stopped")
    _fake_success(monkeypatch, driver, [0.1, 0.2, 0.3])
    run = tmp_path / "run"
    argv = ["--every", "1", "--max-iterations", "3", *EVAL, "--out", str(tmp_path / "c"), "--", *TRAIN,
            "--out", str(run)]
    assert driver.main(argv) == driver.STILL_IMPROVING
    assert json.loads((run / "config.json").read_text())["iteration"] == 3
    assert "still improving at --max-iterations 3" in capsys.readouterr().out


def test_a_run_grown_in_chunks_equals_one_trained_at_once(tmp_path, monkeypatch):
    from icl_metarl.study import cli
    driver = load_script("train_until_stopped")
    _fake_success(monkeypatch, driver, [0.5, 0.4, 0.3])
    chunks, whole = tmp_path / "chunks", tmp_path / "whole"
    assert driver.main(["--every", "1", "--max-iterations", "3", *EVAL, "--out", str(tmp_path / "c"), "--", *TRAIN,
                        "--out", str(chunks)]) == 0
    assert cli.main(["train", *TRAIN, "--iterations", "3", "--out", str(whole)]) == 0
    from safetensors.torch import load_file
    a, b = load_file(chunks / "state.safetensors"), load_file(whole / "state.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("train, message", [
    ([], "no training command"),
    (TRAIN + ["--iterations", "5", "--out", "r"], "must not give --iterations"),
    (TRAIN, "must name its run directory"),
    (TRAIN[:-4] + ["--checkpoint-every", "2", "--out", "r"], "--checkpoint-every 2"),
])
def test_bad_commands_are_one_line_errors(tmp_path, capsys, train, message):
    driver = load_script("train_until_stopped")
    assert driver.main(["--every", "1", "--max-iterations", "3", "--out", str(tmp_path), "--", *train]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_play_settings_fail_before_any_training(tmp_path, capsys):
    driver = load_script("train_until_stopped")
    run = tmp_path / "run"
    argv = ["--every", "1", "--max-iterations", "3", "--split", "bogus", "--out", str(tmp_path / "c"), "--", *TRAIN,
            "--out", str(run)]
    assert driver.main(argv) == 2
    assert "bogus" in capsys.readouterr().err and not run.exists()
