"""Quickstart: configuration files, stage reuse and resume, the report's figures; one slow end-to-end run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from icl_metarl.harness import report, statistics
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.suites import get_suite
from icl_metarl.study import config as qc
from icl_metarl.study import quickstart as qs
from icl_metarl.study.ml1_presets import QUICKSTART_ML1

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, obj, name="c.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# ----------------------------------------------------------------------------------- config files
def test_config_file_overrides_its_preset(tmp_path):
    path = write(tmp_path, {"size": "tiny", "suite": "ML1:push-v3", "expert_goal_offsets": [],
                            "evaluate": {"seeds": [3, 4], "num_tasks": 2},
                            "meta_train": {"algo": "reptile", "hidden": [8]}, "stages": ["report", "generate"]})
    cfg = qc.load_config(path)
    expected = qc.tiny()  # the same configuration built by hand
    assert cfg.suite == "ML1:push-v3" and cfg.episode_length == expected.episode_length
    assert cfg.evaluate.seeds == (3, 4) and cfg.evaluate.num_tasks == 2
    assert cfg.evaluate.adaptation_episodes == expected.evaluate.adaptation_episodes
    assert cfg.meta_train.algo == "reptile" and cfg.meta_train.hidden == (8,)
    assert cfg.pretrain == expected.pretrain
    assert cfg.stages == ("generate", "report")  # put in dependency order
    # the owned settings come from the top level, whatever the section's own default
    assert qc.stage_config(cfg, "meta-train").suite == "ML1:push-v3"
    assert qc.stage_config(cfg, "generate").expert_goal_offsets == () == qc.stage_config(cfg, "meta-train").expert_goal_offsets
    assert qc.stage_config(expected, "generate").expert_goal_offsets == ("reach-v3=0,0,0.045",)  # the reach preset's
    assert qc.stage_config(cfg, "evaluate").split == "test" and qc.stage_config(cfg, "generate").split == "train"
    assert qc.stage_config(cfg, "pretrain", tmp_path).data == [str(tmp_path / "histories")]


def test_generate_extra_sets_are_generated_and_pretrained_on(tmp_path):
    """Extra history sets: settings on top of the generate section, owned ones from the top level; the
    generate stage writes each to histories-N and pretraining reads them all; changing one redoes it."""
    path = write(tmp_path, {"size": "tiny", "suite": "ML1:push-v3", "expert_goal_offsets": [], "generate": {"trials": 4, "trials_per_shard": 2},
                            "generate_extra": [{"noise_kind": "uniform", "noise_max": 1.0, "seed": 41, "trials": 2}]})
    cfg = qc.load_config(path)
    (extra,) = qc.extra_generate_configs(cfg)
    assert (extra.noise_kind, extra.noise_max, extra.seed, extra.trials) == ("uniform", 1.0, 41, 2)
    assert (extra.suite, extra.split, extra.trials_per_shard) == ("ML1:push-v3", "train", 2)  # owned / inherited
    out = tmp_path / "study"
    assert qc.stage_config(cfg, "pretrain", out).data == [str(out / "histories"), str(out / "histories-1")]
    again = qc.config_from_dict(json.loads(json.dumps(qc.to_dict(cfg))))
    assert qc.extra_generate_configs(again) == [extra]
    summary = qs.run_generate(cfg, out)
    from icl_metarl.incontext.shards import load_histories

    h = load_histories(out / "histories-1")
    assert (h.manifest["settings"]["noise_kind"], h.manifest["settings"]["trials"]) == ("uniform", 2)
    assert summary["trials"] == 4 and summary["extra"][0]["trials"] == 2
    changed = qc.config_from_dict({**json.loads(path.read_text()), "generate_extra": [{"trials": 4}]})
    assert qs.stage_settings(changed, "generate", out) != qs.stage_settings(cfg, "generate", out)


def test_to_dict_round_trips():
    cfg = qc.tiny()
    again = qc.config_from_dict(json.loads(json.dumps(qc.to_dict(cfg))))
    assert qc.to_dict(again) == qc.to_dict(cfg)
    assert again.evaluate == cfg.evaluate and again.probe == cfg.probe


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({"sizes": "tiny"}, "'sizes'"),
    ({"size": "huge"}, "'huge'"),
    ({"suite": "ML11"}, "'ML11'"),
    ({"pretrain": {"d_modle": 64}}, "'d_modle'"),
    ({"pretrain": {"steps": "many"}}, "pretrain.steps"),
    ({"pretrain": {"steps": True}}, "pretrain.steps"),
    ({"pretrain": {"out": "elsewhere"}}, "pretrain.out"),
    ({"evaluate": {"suite": "ML10"}}, "evaluate.suite"),
    ({"evaluate": {"seeds": []}}, "seed"),
    ({"meta_train": {"algo": "sgd"}}, "'sgd'"),
    ({"generate": {"noise_kind": "pink"}}, "'pink'"),
    ({"generate": 5}, "'generate'"),
    ({"stages": ["generate", "train"]}, "'train'"),
    ({"pretrain": {"episodes_per_window": 9}}, "episodes_per_window"),
    ({"torch_threads": -1}, "torch_threads"),
    ({"split": "val"}, "split 'val'"),
    ({"suite": "ML1:push-v3"}, "expert_goal_offsets names reach-v3, not an environment of suite ML1:push-v3"),
    ({"expert_goal_offsets": ["bin-picking-v3=0,0,0.1"]}, "bin-picking-v3, not an environment of suite ML1:reach-v3"),
    ({"generate": {"expert_goal_offsets": []}}, "generate.expert_goal_offsets"),
    ({"suite": "ML10-holdout", "split": "test"}, "use --suite ML10 for the test split"),
    ({"generate_extra": {"trials": 4}}, "generate_extra must be a list"),
    ({"generate_extra": [{"noise_kind": "pink"}]}, "'pink'"),
    ({"generate_extra": [{"suite": "ML10"}]}, "generate.suite"),
    ({"generate_extra": [{"episodes_per_trial": 3}]}, "generate_extra trial"),
])
def test_invalid_files_are_one_line_usage_errors(tmp_path, content, fragment):
    path = write(tmp_path, content)
    with pytest.raises(UsageError) as e:
        qc.load_config(path, size="tiny")
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and str(path) in msg


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        qc.load_config(tmp_path / "nope.json")


def test_shipped_configs_load():
    files = sorted(CONFIGS.glob("*.json"))
    assert len(files) >= 20
    suites = set()
    for f in files:
        cfg = qc.load_config(f)
        suites.add(cfg.suite)
        assert cfg.budget and cfg.name == f.stem
        gradient = "meta-train" in cfg.stages
        if f.stem.endswith("-cpu"):  # a whole study at a CPU budget: both learners, every stage
            assert set(cfg.stages) == set(qc.STAGES)
            continue
        assert gradient != ("pretrain" in cfg.stages)  # each file is one learner's study
        if gradient:
            assert cfg.meta_train.algo in f.stem
    assert suites == {"ML1:reach-v3", "ML1:push-v3", "ML1:pick-place-v3", "ML10", "ML45"}
    readme = (CONFIGS / "README.md").read_text()
    for f in files:  # every file has its budget written beside it
        assert f.name in readme


def test_cli_bad_config_exits_2(tmp_path):
    path = write(tmp_path, {"pretrain": {"steps": -1}, "size": "unknown"})
    out = run_cli("quickstart", "--out", tmp_path / "o", "--config", path)
    assert out.returncode == 2 and "'unknown'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- reuse and resume
def test_stage_markers(tmp_path):
    settings = {"a": 1, "b": [1, 2]}
    assert not qs.stage_done(tmp_path, "pretrain", settings)
    qs.mark_done(tmp_path, "pretrain", settings, 1.0, {})
    assert qs.stage_done(tmp_path, "pretrain", json.loads(json.dumps(settings)))
    with pytest.raises(UsageError, match=r"pretrain with b=\[1, 2\], not \[1, 3\]"):
        qs.stage_done(tmp_path, "pretrain", {"a": 1, "b": [1, 3]})
    qs.marker_path(tmp_path, "probe").write_text('{"settings": ')  # cut by a kill: redo, do not trust
    assert not qs.stage_done(tmp_path, "probe", settings)


def test_rerun_reuses_finished_stages_and_redoes_the_killed_one(tmp_path, monkeypatch):
    calls = []

    def fake(stage):
        def run(cfg, out):
            calls.append(stage)
            if stage == "pretrain" and fail["pretrain"]:
                raise KeyboardInterrupt  # killed mid-stage
            return {}
        return run

    fail = {"pretrain": True}
    monkeypatch.setattr(qs, "RUNNERS", {s: fake(s) for s in qc.STAGES})
    cfg = qc.tiny()
    with pytest.raises(KeyboardInterrupt):
        qs.run_quickstart(cfg, tmp_path, say=lambda m: None)
    assert calls == ["generate", "pretrain"]
    assert qs.marker_path(tmp_path, "generate").is_file() and not qs.marker_path(tmp_path, "pretrain").exists()

    fail["pretrain"], calls[:] = False, []
    lines = []
    qs.run_quickstart(cfg, tmp_path, say=lines.append)
    assert calls == ["pretrain", "meta-train", "evaluate", "probe", "report"]
    assert any("generate: already done" in l for l in lines)

    calls.clear()
    qs.run_quickstart(cfg, tmp_path, say=lambda m: None)
    assert calls == ["report"]  # only the report is rewritten

    cfg.pretrain.steps += 1  # a finished stage with other settings is refused, not silently reused
    with pytest.raises(UsageError, match="pretrain with steps=10, not 11"):
        qs.run_quickstart(cfg, tmp_path, say=lambda m: None)


def test_only_distributed_stages_under_accelerate(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = qc.tiny()
    with pytest.raises(UsageError, match="run only --stages generate,pretrain,meta-train,evaluate; got .*probe"):
        qs.run_quickstart(cfg, tmp_path, say=lambda m: None)


# ------------------------------------------------------------------------------------ the report
def _results(success: dict[str, np.ndarray], adaptive: dict[str, bool], spec: dict[str, str]) -> dict:
    """A results.json of hand-made success arrays (episodes, tasks, seeds)."""
    e, t, s = next(iter(success.values())).shape
    records = [{"agent": a, "seed": seed, "task": j, "episode": k, "success": bool(x[k, j, i]), "return": 0.0,
                "steps_to_success": None}
               for a, x in success.items() for k in range(e) for j in range(t) for i, seed in enumerate(range(s))]
    return {"settings": {"adaptation_episodes": e - 1, "evaluation_episodes": 1}, "tasks": [{}] * t,
            "seeds": list(range(s)), "records": records,
            "agents": {a: {"spec": spec[a], "adaptive": adaptive[a]} for a in success}}


def test_adaptation_summary_against_hand_counts():
    rng = np.random.default_rng(0)
    icl = (rng.random((4, 30, 2)) < np.array([0.1, 0.3, 0.6, 0.7])[:, None, None]).astype(float)
    wiped = (rng.random((4, 30, 2)) < 0.1).astype(float)
    rows = {r["agent"]: r for r in report.adaptation_summary(
        _results({"icl": icl, "icl-wiped": wiped}, {"icl": True, "icl-wiped": False}, {"icl": "run", "icl-wiped": "run"}),
        num_resamples=500)}
    r = rows["icl"]
    assert r["last_index"] == 3
    assert r["first"][0] == pytest.approx(icl[0].mean()) and r["last"][0] == pytest.approx(icl[2].mean())
    assert r["gain"][0] == pytest.approx(icl[2].mean() - icl[0].mean())
    assert r["vs_non_adaptive"][0] == pytest.approx(icl[2].mean() - wiped[2].mean())
    per_task = (icl[2] - wiped[2]).mean(1)  # seeds averaged
    won, lost = int((per_task > 0).sum()), int((per_task < 0).sum())
    assert r["won_lost"][:3] == (won, lost, 30) and won > lost > 0
    assert r["won_lost"][3] == pytest.approx(statistics.sign_test(won, lost))
    assert r["gain"][1] > 0 and report._verdict(r["gain"]).startswith("yes")
    assert "vs_non_adaptive" not in rows["icl-wiped"]
    assert report._verdict(rows["icl-wiped"]["gain"]).startswith("not shown")


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "icl_metarl.study.cli", "quickstart", "--out", str(out), "--size", "tiny"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    for link in links:  # every link and image of the report exists
        assert (out / link).exists(), link
    pngs = {l for l in links if l.endswith(".png")}
    assert {"eval/success.png", "training.png", "probe/attention_layer_head.png"} <= pngs
    assert any(l.startswith("probe/attention_map_") for l in pngs)
    assert "eval/report.md" in links and "probe/probe.md" in links
    results = json.loads((out / "eval" / "results.json").read_text())
    labels = set(results["agents"])
    assert {"random", "oracle", "icl"} <= labels and any(l.startswith("maml") for l in labels)
    assert sum("[non-adaptive]" in l for l in labels) == 2 and not results["failures"]
    for label in labels:  # every agent's row is in the report's table
        assert f"| {label} |" in report
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 0 and second.stdout.count("already done") == 5


# ------------------------------------------------------------------------------------ study seed
def test_study_seed_shifts_data_training_and_evaluation_seeds_together():
    base, other = qc.tiny(), qc.tiny()
    other.seed = 2
    for stage in ("generate", "pretrain", "meta-train"):
        assert qc.stage_config(other, stage).seed == qc.stage_config(base, stage).seed + 2
    seeds0, seeds2 = (set(qc.stage_config(c, "evaluate").seeds) for c in (base, other))
    assert seeds0 and seeds2 and not seeds0 & seeds2  # two study seeds never share an evaluation seed
    for c in (base, other):  # the probe replays the evaluator's first batch
        assert qc.stage_config(c, "probe").seed == qc.stage_config(c, "evaluate").seeds[0]
    for stage in ("generate", "meta-train", "probe"):  # the benchmark's tasks stay the same
        assert qc.stage_config(other, stage).suite_seed == qc.stage_config(base, stage).suite_seed
    assert qc.stage_config(other, "evaluate").task_seed == qc.stage_config(base, "evaluate").task_seed
    assert qc.to_dict(other)["seed"] == 2 and qc.config_from_dict(qc.to_dict(other)).seed == 2


def test_study_seed_from_the_command_line_and_a_finished_stage_with_another_seed(tmp_path):
    cfg = qc.QuickstartCommand(size="tiny", seed=3).config_for()
    assert cfg.seed == 3
    qs.mark_done(tmp_path, "generate", qs.stage_settings(qc.tiny(), "generate", tmp_path), 1.0, {})
    with pytest.raises(UsageError, match="generate with seed=0, not 3"):
        qs.stage_done(tmp_path, "generate", qs.stage_settings(cfg, "generate", tmp_path))
    with pytest.raises(UsageError, match="seed must be an integer >= 0, got -1"):
        qc.config_from_dict({"size": "tiny", "seed": -1})


def test_suite_and_split_from_the_command_line_choose_on_held_out_environments():
    cfg = qc.QuickstartCommand(config=str(CONFIGS / "ml10-cpu.json"), suite="ML10-holdout", split="validation").config_for()
    assert cfg.suite == "ML10-holdout" and qc.stage_config(cfg, "evaluate").split == "validation"
    assert qc.stage_config(cfg, "generate").suite == "ML10-holdout" == qc.stage_config(cfg, "meta-train").suite
    with pytest.raises(UsageError, match="use --suite ML10 for the test split"):
        qc.QuickstartCommand(config=str(CONFIGS / "ml10-cpu.json"), suite="ML10-holdout").config_for()


def test_suite_ml1_takes_the_measured_expert_settings():
    """--suite ML1:<env> takes the environment's episode length and goal offset from results/expert-ml1."""
    for size in ("tiny", "default"):
        cfg = qc.QuickstartCommand(size=size, suite="ML1:pick-place-v3").config_for()  # refused before issue 36
        assert cfg.episode_length == QUICKSTART_ML1["pick-place-v3"].episode_length > 50
        assert cfg.expert_goal_offsets == ()
        for stage in ("generate", "meta-train", "evaluate", "probe"):
            assert qc.stage_config(cfg, stage).episode_length == cfg.episode_length
    reach, default = qc.QuickstartCommand(suite="ML1:reach-v3").config_for(), qc.QuickstartCommand().config_for()
    assert (reach.episode_length, reach.expert_goal_offsets, reach.budget) == \
        (default.episode_length, default.expert_goal_offsets, default.budget) == (50, ("reach-v3=0,0,0.045",), default.budget)
    with pytest.raises(UsageError, match="unknown Meta-World environment 'pick-place-v2'; valid: .*pick-place-v3"):
        qc.QuickstartCommand(size="tiny", suite="ML1:pick-place-v2").config_for()
    below = next(e for e, p in QUICKSTART_ML1.items() if p.success < 0.9)
    with pytest.raises(UsageError, match=f"cannot study ML1:{below}: .* {QUICKSTART_ML1[below].success:.2f} "):
        qc.QuickstartCommand(size="tiny", suite=f"ML1:{below}").config_for()


@pytest.mark.slow
def test_same_study_seed_same_figures_other_seed_other_data(tmp_path):
    """Two runs of the tiny study with seed 1 report the same figures; seed 2 plays other data and trials."""
    def run(seed, where):
        cmd = [sys.executable, "-m", "icl_metarl.study.cli", "quickstart", "--size", "tiny", "--seed", str(seed),
               "--out", str(where)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        results = json.loads((where / "eval" / "results.json").read_text())
        stage_rows = tuple(f"| {stage} |" for stage in qc.STAGES) + ("| stage |",)  # their seconds vary
        figures = [l for l in (where / "report.md").read_text().splitlines()
                   if l.startswith(("- Does", "- Which", "| ")) and not l.startswith(stage_rows)]
        return results, figures

    a, fig_a = run(1, tmp_path / "a")
    b, fig_b = run(1, tmp_path / "b")
    assert fig_a == fig_b and any(l.startswith("- Does `icl`") for l in fig_a)
    key = lambda r: (r["agent"], r["seed"], r["task"], r["episode"], r["return"], r["success"])  # noqa: E731
    assert sorted(map(key, a["records"])) == sorted(map(key, b["records"]))
    assert a["seeds"] == b["seeds"] == list(qc.stage_config(qc.QuickstartCommand(size="tiny", seed=1).config_for(),
                                                              "evaluate").seeds)

    from icl_metarl.incontext.histories import generate  # seed 2: other training data, other trial seeds
    other = qc.QuickstartCommand(size="tiny", seed=2).config_for()
    cfg1 = qc.QuickstartCommand(size="tiny", seed=1).config_for()
    first = generate(qc.stage_config(cfg1, "generate"), tmp_path / "h1")
    second = generate(qc.stage_config(other, "generate"), tmp_path / "h2")
    assert first["settings"]["seed"] != second["settings"]["seed"]
    assert first["tasks"] != second["tasks"]  # other fresh goals
    assert first["shards"]["00000"]["sha256"]["obs"] != second["shards"]["00000"]["sha256"]["obs"]


# ------------------------------------------------------------------------- train-split diagnostic
@pytest.mark.slow  # builds ML10's ten train and five test environments (~30 s)
def test_train_diagnostic_plays_every_train_environment_beside_the_test_split(tmp_path):
    cfg = qc.tiny()
    cfg.suite, cfg.expert_goal_offsets, cfg.episode_length = "ML10", (), 10
    cfg.stages, cfg.train_diagnostic = ("evaluate", "report"), 1
    cfg.evaluate.num_tasks, cfg.evaluate.adaptation_episodes = 2, 1
    qs.run_quickstart(cfg, tmp_path, say=lambda m: None)
    test = json.loads((tmp_path / "eval" / "results.json").read_text())
    train = json.loads((tmp_path / qc.TRAIN_DIAGNOSTIC_DIR / "results.json").read_text())
    assert test["settings"]["split"] == "test" and train["settings"]["split"] == "train"
    train_envs = [t["env_name"] for t in train["tasks"]]
    assert sorted(train_envs) == sorted(get_suite("ML10").envs("train"))  # one task of each
    assert not set(train_envs) & {t["env_name"] for t in test["tasks"]}
    assert train["seeds"] == test["seeds"] and set(train["agents"]) == set(test["agents"])
    report = (tmp_path / "report.md").read_text()
    assert "## Train environments (a diagnostic, not a result)" in report and "| oracle |" in report
    assert (tmp_path / qc.TRAIN_DIAGNOSTIC_DIR / "report.md").is_file()

    cfg.train_diagnostic = 2  # the finished evaluation played one task per environment: not reused silently
    with pytest.raises(UsageError, match="evaluate with train_diagnostic=1, not 2"):
        qs.run_quickstart(cfg, tmp_path, say=lambda m: None)


def test_a_bad_train_diagnostic_is_a_one_line_error():
    cfg = qc.tiny()
    cfg.train_diagnostic = -1
    with pytest.raises(UsageError, match="train_diagnostic must be an integer >= 0"):
        qc.check_config(cfg)
