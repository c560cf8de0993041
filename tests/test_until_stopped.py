"""study/until_stopped.py, ``icl-metarl train LEARNER --until-stopped``: train a gradient learner in chunks until
its validation curve stops rising."""

import json

import pytest

from icl_metarl.harness import registry
from icl_metarl.study import cli, curves, until_stopped

TRAIN = ["train", "reptile", "--suite", "ML1:reach-v3", "--task-pool", "fresh", "--episode-length", "10",
         "--meta-batch", "2", "--hidden", "4", "--ppo-epochs", "1", "--checkpoint-every", "1", "--seed", "3"]
PLAY = ["-K", "1", "-E", "1", "--tasks", "2"]


def _fake_success(monkeypatch, values):
    """Make the validation figure of the point at iteration i be values[i - 1] (playing nothing): the loop's
    stopping is then checked against a curve the test chooses, while the training it drives is real."""

    def evaluate(agents, config, out):
        return {"fake": int(str(out).rsplit("-", 1)[1])}

    def adaptation_summary(results):
        v = values[results["fake"] - 1]
        return [{"adaptive": True, "agent": "reptile", "first": (0.0, 0.0, 0.0), "last": (v, v, v)}]

    monkeypatch.setattr(curves, "load_agents", lambda *a, **k: None)
    monkeypatch.setattr(curves, "evaluate", evaluate)
    monkeypatch.setattr(curves, "adaptation_summary", adaptation_summary)


def _until_stopped(run, curves_dir, *rule):
    return [*TRAIN, "--out", str(run), "--until-stopped", str(curves_dir), *rule, *PLAY]


def test_stops_two_points_after_the_best_and_resumes_without_training(tmp_path, monkeypatch, capsys):
    _fake_success(monkeypatch, [0.1, 0.3, 0.2, 0.3, 0.9, 0.9])
    run, curves_dir = tmp_path / "run", tmp_path / "curves"
    argv = _until_stopped(run, curves_dir, "--every", "1", "--iterations", "6")
    assert cli.main(argv) == 0
    # best 0.3 at iteration 2 (the tie at 4 goes to the earlier point); 3 and 4 do not beat it: stop at 4
    assert json.loads((run / "config.json").read_text())["iteration"] == 4
    data = json.loads((curves_dir / "curves.json").read_text())
    assert [p["point"] for p in data["points"]] == [f"iteration-00000{i}" for i in (1, 2, 3, 4)]
    assert data["chosen"][str(run)]["point"] == "iteration-000002"
    assert data["settings"]["episode_length"] == 10 and data["settings"]["split"] == "validation"  # the training's
    assert "stopped improving at iteration 4; play iteration-000002 on test" in capsys.readouterr().out

    monkeypatch.setattr(registry, "train", lambda *a: pytest.fail("a stopped run was trained again"))
    assert cli.main(argv) == 0


def test_min_iterations_trains_on_past_an_early_stop(tmp_path, monkeypatch, capsys):
    _fake_success(monkeypatch, [0.3, 0.1, 0.1, 0.2, 0.2])
    run = tmp_path / "run"
    argv = _until_stopped(run, tmp_path / "c", "--iterations", "9", "--min-iterations", "5")  # --every: 1, the checkpoints'
    assert cli.main(argv) == 0  # stopped by the rule at 3, trained on to 5, best still the first point
    assert json.loads((run / "config.json").read_text())["iteration"] == 5
    assert "stopped improving at iteration 5; play iteration-000001" in capsys.readouterr().out


def test_the_cap_comes_first_and_says_so(tmp_path, monkeypatch, capsys):
    _fake_success(monkeypatch, [0.1, 0.2, 0.3])
    run = tmp_path / "run"
    assert cli.main(_until_stopped(run, tmp_path / "c", "--iterations", "3")) == until_stopped.STILL_IMPROVING
    assert json.loads((run / "config.json").read_text())["iteration"] == 3
    assert "still improving at --iterations 3" in capsys.readouterr().out


def test_a_run_grown_in_chunks_equals_one_trained_at_once(tmp_path, monkeypatch):
    _fake_success(monkeypatch, [0.5, 0.4, 0.3])
    chunks, whole = tmp_path / "chunks", tmp_path / "whole"
    assert cli.main(_until_stopped(chunks, tmp_path / "c", "--iterations", "3")) == 0
    assert cli.main([*TRAIN, "--iterations", "3", "--out", str(whole)]) == 0
    from safetensors.torch import load_file
    a, b = load_file(chunks / "state.safetensors"), load_file(whole / "state.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("rule, message", [
    (["--every", "2", "--iterations", "1"], "need 1 <= every <= iterations"),
    (["--every", "1", "--min-iterations", "4", "--iterations", "3"], "min-iterations <= iterations"),
    (["--every", "1", "--patience", "0"], "patience >= 1"),
    (["--every", "3", "--checkpoint-every", "2"], "--checkpoint-every 2 must divide --every 3"),
])
def test_bad_rules_are_one_line_errors_before_any_training(tmp_path, capsys, rule, message):
    run = tmp_path / "run"
    assert cli.main(_until_stopped(run, tmp_path / "c", *rule)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not run.exists()


def test_bad_play_settings_fail_before_any_training(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_until_stopped(run, tmp_path / "c", "--split", "bogus")) == 2
    assert "bogus" in capsys.readouterr().err and not run.exists()


def test_a_rule_without_until_stopped_is_refused_not_ignored(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main([*TRAIN, "--patience", "3", "--out", str(run)]) == 2
    assert "--patience is a setting of --until-stopped" in capsys.readouterr().err and not run.exists()


def test_only_learners_whose_runs_grow_in_chunks_offer_it():
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "icl", "--data", "d", "--out", "o", "--until-stopped", "c"])
    assert parser.parse_args([*TRAIN, "--out", "o", "--until-stopped", "c"]).until_stopped == "c"
