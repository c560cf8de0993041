"""study/curves.py, ``icl-metarl curves``: every snapshot of a run played on the validation split, with its budget."""

import json

import pytest

from gradient_meta.meta_rl import SNAPSHOTS, MetaRLConfig, meta_train
from icl_metarl.harness.budget import read_budget
from icl_metarl.harness.settings import from_args
from icl_metarl.study import cli
from icl_metarl.study import curves as bc


def _curves(args):
    return cli.main(["curves", *args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curves") / "maml"
    meta_train(MetaRLConfig(iterations=3, meta_batch=2, episode_length=10, hidden=(4,), ppo_epochs=1,
                            checkpoint_every=2, seed=1), out, progress=False)
    return out


def test_meta_rl_keeps_a_snapshot_per_checkpoint_with_its_budget(run):
    snaps = sorted((run / SNAPSHOTS).iterdir())
    assert [p.name for p in snaps] == ["iteration-000002", "iteration-000003"]
    steps = [read_budget(p)["env_steps"] for p in snaps]
    assert steps == [2 * 2 * 2 * 10, 3 * 2 * 2 * 10] and read_budget(run) == read_budget(snaps[-1])
    assert json.loads((snaps[0] / "config.json").read_text())["iteration"] == 2


def test_curves_play_every_snapshot_and_resume(run, tmp_path, monkeypatch):
    args = [str(run), "--suite", "ML1:reach-v3", "-K", "2", "-E", "1", "--episode-length", "10", "--tasks", "2",
            "--out", str(tmp_path)]
    assert _curves(args) == 0
    data = json.loads((tmp_path / "curves.json").read_text())
    assert [p["point"] for p in data["points"]] == ["iteration-000002", "iteration-000003"]
    assert data["points"][0]["budget"]["env_steps"] < data["points"][1]["budget"]["env_steps"]
    assert data["settings"]["split"] == "validation" and (tmp_path / "budget_curves.png").stat().st_size > 0
    assert data["chosen"][str(run)]["point"] in ("iteration-000002", "iteration-000003")
    assert f"- {run}: play {data['chosen'][str(run)]['point']} on test" in (tmp_path / "curves.md").read_text()
    first = json.loads((tmp_path / "evals" / "maml" / "iteration-000002" / "results.json").read_text())
    assert first["settings"]["split"] == "validation" and len(first["tasks"]) == 2

    def refuse(*a, **k):
        raise AssertionError("a finished point was played again")

    monkeypatch.setattr(bc, "evaluate", refuse)
    assert _curves(args) == 0  # resumed: nothing to play


def test_a_run_without_a_budget_is_a_clear_error(tmp_path, capsys):
    assert _curves([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "has no budget.json" in capsys.readouterr().err


def test_relabelling_phases_are_points_with_cumulative_budgets(tmp_path):
    from icl_metarl.harness.budget import Budget, write_budget
    own = [Budget(1000, 1000, 10, 1.0, 2.0, 0.5, {"train": [0], "data": [7]}),  # phase 0: base data
           Budget(1300, 1300, 10, 1.5, 3.0, 0.5, {"train": [0], "data": [7]})]  # phase 1: base + relabelled
    for r, b in enumerate(own):
        phase = tmp_path / f"round-{r}" / "train"
        write_budget(phase, b)
        (phase / "config.json").write_text("{}")
    (tmp_path / "round-2" / "train").mkdir(parents=True)  # an unfinished phase is not a point
    points = bc.snapshots(tmp_path)
    assert [name for name, _, _ in points] == ["round-0", "round-1"]
    last = points[1][2]
    assert (last["env_steps"], last["expert_labels"], last["optimizer_steps"]) == (1300, 1300, 20)
    assert last["train_cpu_minutes"] == pytest.approx(2.5) and last["data_cpu_minutes"] == pytest.approx(3.0)


def _point(run, i, success):
    return {"run": run, "point": f"iteration-{i:06d}", "budget": {"env_steps": 1000 * i},
            "success_last": [success, success - 0.1, success + 0.1]}


def test_choice_is_the_best_validation_point_ties_to_the_earlier_and_says_if_it_stopped():
    choose = bc.choose
    rising = [_point("a", i, s) for i, s in ((3, 0.5), (1, 0.1), (2, 0.3))]  # out of order on purpose
    plateau = [_point("b", i, s) for i, s in ((1, 0.2), (2, 0.4), (3, 0.4), (4, 0.3))]
    chosen = choose(rising + plateau, patience=2)
    assert chosen["a"]["point"] == "iteration-000003" and not chosen["a"]["stopped_improving"]
    assert chosen["b"]["point"] == "iteration-000002"  # the tie at 0.40 goes to the cheaper point
    assert chosen["b"]["points_after"] == 2 and chosen["b"]["stopped_improving"]
    assert not choose(plateau, patience=3)["b"]["stopped_improving"]


def test_every_keeps_the_multiples_and_the_last_snapshot(run, tmp_path):
    from icl_metarl.harness.budget import Budget, write_budget
    assert [n for n, _, _ in bc.snapshots(run, every=2)] == ["iteration-000002", "iteration-000003"]
    fake = tmp_path / "long"
    for i in (80, 160, 240, 320, 350):
        snap = fake / "snapshots" / f"iteration-{i:06d}"
        write_budget(snap, Budget(env_steps=i, optimizer_steps=i))
        (snap / "config.json").write_text(json.dumps({"iteration": i, "config": {"iterations": 400}}))
    still_running = ["iteration-000160", "iteration-000320"]  # 350 is only the newest, not the last
    assert [n for n, _, _ in bc.snapshots(fake, every=160)] == still_running
    (snap / "config.json").write_text(json.dumps({"iteration": 350, "config": {"iterations": 350}}))
    assert [n for n, _, _ in bc.snapshots(fake, every=160)] == still_running + ["iteration-000350"]


def test_a_bad_every_is_a_clear_error(run, tmp_path, capsys):
    assert _curves([str(run), "--every", "0", "--out", str(tmp_path)]) == 2
    assert "--every 0" in capsys.readouterr().err


def test_reuse_takes_earlier_points_of_the_named_runs_and_refuses_other_settings(run, tmp_path, monkeypatch, capsys):
    common = ["--suite", "ML1:reach-v3", "-K", "2", "-E", "1", "--episode-length", "10", "--tasks", "2"]
    assert _curves([str(run), *common, "--out", str(tmp_path / "a")]) == 0
    played = json.loads((tmp_path / "a" / "curves.json").read_text())["points"]

    def refuse(*a, **k):
        raise AssertionError("a point of a reused directory was played again")

    monkeypatch.setattr(bc, "evaluate", refuse)
    assert _curves([str(run) + "/", *common, "--reuse", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "curves.json").read_text())["points"] == played
    assert (tmp_path / "b" / "budget_curves.png").stat().st_size > 0
    capsys.readouterr()
    assert _curves([str(run), *common[:-1], "3", "--reuse", str(tmp_path / "a"), "--out", str(tmp_path / "c")]) == 2
    assert "played with other settings" in capsys.readouterr().err


def test_many_runs_plot_one_colour_per_learner(tmp_path):
    assert [bc._family(a) for a in ("maml-iteration-000160", "maml-iteration-000160 #2", "icl #3", "icl", "meta-sgd")] \
        == ["maml", "maml", "icl", "icl", "meta-sgd"]
    points = [{"run": f"runs/{f}-s{s}", "point": f"p{i}", "agent": f"{f}-iteration-{i:06d}", "split": "validation",
               "budget": {"env_steps": 1000 * i, "cpu_minutes": 0.5 * i}, "success_last": [0.1 * i, 0.0, 0.2 * i]}
              for f in ("maml", "reptile") for s in range(4) for i in (1, 2)]
    bc.plot(points, tmp_path / "curves.png")  # 8 runs: the legend goes beside the plots
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_plot_keeps_each_learners_runs_together_in_the_legend():
    # a MAML seed curved later (--reuse) comes after Reptile's runs in the points; the plot groups it with MAML's
    runs = [("maml", 0), ("reptile", 0), ("reptile", 1), ("maml", 1), ("icl", 0)]
    points = [{"run": f"runs/{f}-s{s}", "agent": f"{f}-iteration-{i:06d}"} for f, s in runs for i in (1, 2)]
    assert bc.grouped_runs(bc.run_families(points)) == ["runs/maml-s0", "runs/maml-s1", "runs/reptile-s0", "runs/reptile-s1",
                                       "runs/icl-s0"]


def test_until_stopped_plays_as_curves_does_with_the_trainings_suite_and_episode_length():
    play = ["--split", "test", "-K", "5", "-E", "2", "--seeds", "3", "4", "--tasks", "7", "--deterministic"]
    parser = cli.build_parser()
    curve = parser.parse_args(["curves", "r", "--suite", "ML1:push-v3", "--episode-length", "100", *play, "--out", "o"])
    train = parser.parse_args(["train", "maml", "--suite", "ML1:push-v3", "--episode-length", "100", "--out", "r",
                               "--until-stopped", "o", *play])
    assert from_args(cli.CurvePlay, curve) == cli.CurvePlay("ML1:push-v3", "test", 5, 2, 100, (3, 4), 7, deterministic=True)
    from_training = {"suite": train.suite, "episode_length": train.episode_length, "task_seed": train.suite_seed}
    assert from_args(cli.CurvePlay, train, **from_training) == from_args(cli.CurvePlay, curve)


def test_until_stopped_plays_the_split_of_the_trainings_benchmark_seed(monkeypatch):
    """A run trained with --suite-seed 2 is chosen on that seed's validation tasks, not seed 0's."""
    seen = []
    monkeypatch.setattr(cli, "_run", lambda target, *args, **kw: seen.append(args[4]) or 0)
    argv = ["train", "maml", "--suite", "ML1:push-v3", "--suite-seed", "2", "--episode-length", "100", "--out", "r",
            "--until-stopped", "o", "--tasks", "7"]
    assert cli.main(argv) == 0
    (play,) = seen
    assert (play.suite, play.episode_length, play.task_seed, play.split, play.num_tasks) == ("ML1:push-v3", 100, 2,
                                                                                           "validation", 7)
    assert from_args(cli.CurvePlay, cli.build_parser().parse_args(["curves", "r", "--out", "o", "--task-seed", "3"])
                     ).eval_config().task_seed == 3
