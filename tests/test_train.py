import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _scripts import load_script
from conftest import run_cli
from safetensors.torch import load_file

from icl_metarl.harness.errors import UsageError
from icl_metarl.incontext.histories import GenerateConfig, generate
from icl_metarl.incontext.shards import load_histories
from icl_metarl.incontext.train import TrainConfig, lr_factor, train, train_checkpoint

TINY = ["--episodes-per-window", "2", "--d-model", "16", "--n-layer", "1", "--n-head", "2", "--batch-size", "4", "--log-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("hist") / "reach"
    generate(GenerateConfig(suite="ML1:reach-v3", trials=6, episodes_per_trial=3, episode_length=20,
                            trials_per_shard=3, workers=1), out, progress=False)
    return out


def _run(args, env=None):
    return subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, **(env or {})))


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "icl_metarl.study.cli", "train", "icl", "--data", str(data), "--out", str(out), *TINY,
            *extra]


def _weights(run):
    return load_file(str(Path(run) / "model.safetensors"))


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run) / "log.jsonl").read_text().splitlines())}


def test_lr_schedule_warms_up_then_decays_to_floor():
    f = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_two_processes_match_one_with_the_same_global_batch_and_see_disjoint_windows(data, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    r = _run(_train_cmd(data, single, "--steps", "4", "--trace-windows"))
    assert r.returncode == 0, r.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29617"]
    r = _run(launch + _train_cmd(data, multi, "--steps", "4", "--trace-windows")[1:])
    # on failure, the rank that crashed first says why (the launcher's own traceback comes last and says little)
    assert r.returncode == 0, "\n".join(x for x in r.stderr.splitlines() if "[rank1]" in x or "Error" in x)[-3000:]
    a, b = _weights(single), _weights(multi)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert _losses(single) == pytest.approx(_losses(multi), rel=1e-5)
    # The two ranks trained on disjoint windows whose union is the single process's batch.
    ranks = [[json.loads(l) for l in (multi / f"windows-rank{i}.jsonl").read_text().splitlines()] for i in (0, 1)]
    one = [json.loads(l) for l in (single / "windows-rank0.jsonl").read_text().splitlines()]
    for step in range(4):
        w0, w1 = ranks[0][step]["windows"], ranks[1][step]["windows"]
        assert len(w0) == len(w1) == 2 and not set(w0) & set(w1)
        assert sorted(w0 + w1) == sorted(one[step]["windows"])


@pytest.mark.slow  # a multi-process representative of this file stays in the default suite
def test_resume_after_sigkill_equals_a_straight_run(data, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    r = _run(_train_cmd(data, straight, "--steps", "8", "--checkpoint-every", "4", "--dropout", "0.1"))
    assert r.returncode == 0, r.stderr
    # Killed with SIGKILL two steps after its checkpoint at step 4: steps 5-6 are lost and redone.
    r = _run(_train_cmd(data, crashed, "--steps", "8", "--checkpoint-every", "4", "--dropout", "0.1", "--kill-after", "6"))
    assert r.returncode == -9
    assert not (crashed / "model.safetensors").exists()
    refused = _run(_train_cmd(data, crashed, "--steps", "8", "--checkpoint-every", "4", "--dropout", "0.1"))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    r = _run(_train_cmd(data, crashed, "--steps", "8", "--checkpoint-every", "4", "--dropout", "0.1", "--resume"))
    assert r.returncode == 0, r.stderr
    assert _losses(crashed) == _losses(straight)  # every step, bit for bit (dropout RNG restored too)
    a, b = _weights(straight), _weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The evaluator's report reads the training task pool from the agent's description.
    from icl_metarl.incontext.agent import InContextAgent

    assert InContextAgent.from_pretrained(crashed).describe()["task_pool"] == "train benchmark (50 tasks)"


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    import icl_metarl.incontext.train as T

    real = T.window_loss
    calls = {"n": 0}

    def poisoned(model, batch, target):
        calls["n"] += 1
        loss = real(model, batch, target)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(T, "window_loss", poisoned)
    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), steps=6, episodes_per_window=2, checkpoint_every=2, batch_size=2,
                      d_model=16, n_layer=1, n_head=2, progress=False)
    with pytest.raises(T.NonFiniteLoss, match="step 3"):
        train(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]


def test_bad_settings_are_one_line_errors(data, tmp_path):
    r = run_cli(*_train_cmd(data, tmp_path / "x", "--steps", "2", "--batch-size", "3", "--grad-accum", "2")[3:])
    assert r.returncode == 2 and "batch size 3" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*_train_cmd(tmp_path / "missing", tmp_path / "x", "--steps", "2")[3:])
    assert r.returncode == 2 and "missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="target"):
        train(TrainConfig(data=[str(data)], target="reward"))


def test_periodic_evaluation_and_tensorboard_log_beside_the_loss(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from icl_metarl.harness.evaluation import play_trials
    from icl_metarl.harness.suites import get_suite
    from icl_metarl.incontext.agent import InContextAgent

    run = tmp_path / "run"
    train(TrainConfig(data=[str(data)], out=str(run), steps=4, episodes_per_window=2, batch_size=2, d_model=16,
                      n_layer=1, n_head=2, log_every=3, eval_every=2, eval_tasks=2, progress=False))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval_success" in r}
    assert sorted(evals) == [2, 4] and [r["step"] for r in records] == [2, 3, 4]
    assert all(len(r["eval_success"]) == 2 and r["eval_tasks"] == 2 and "loss" in r for r in evals.values())
    # The step-4 evaluation is the final model's, played directly through the evaluator's loop, on the
    # validation tasks (the default eval_split: checkpoints are chosen there, never on the test tasks).
    assert all(r["eval_split"] == "validation" for r in evals.values())
    tasks = get_suite("ML1:reach-v3").tasks("validation", 0)[:2]
    direct = [[r["return"] for r in episode] for episode in play_trials(
        InContextAgent.from_pretrained(run, deterministic=True), tasks, env_seed=0, agent_seed=0,
        adaptation_episodes=2, evaluation_episodes=0, episode_length=20)]
    assert evals[4]["eval_return"] == pytest.approx([sum(e) / 2 for e in direct], rel=1e-4)
    assert evals[2]["eval_return"] != pytest.approx(evals[4]["eval_return"], rel=1e-4)  # it is not a stale copy
    # TensorBoard holds the same loss curve and the per-episode success.
    tb = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in tb.Scalars("loss")] == [2, 3, 4]
    assert [e.value for e in tb.Scalars("loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.step for e in tb.Scalars("eval/success_ep2")] == [2, 4]


def test_relabelling_rounds_refuse_several_processes(data, tmp_path, monkeypatch):
    from icl_metarl.incontext.train import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="one process only"):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), steps=4, relabel_rounds=1))


def test_every_checkpoint_step_is_an_agent_the_evaluator_can_play(data, tmp_path):
    """Choosing the step on validation: each kept step directory loads as an agent (its config.json beside
    accelerate's weights), the last one acts exactly as the final checkpoint, and carries its budget."""
    from icl_metarl.harness.budget import read_budget
    from icl_metarl.harness.registry import load_agent

    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), steps=4, episodes_per_window=2, checkpoint_every=2,
                      keep_checkpoints=5, batch_size=2, d_model=16, n_layer=1, n_head=2, progress=False)
    train(cfg)
    steps = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in steps] == ["step-00000002", "step-00000004"]
    obs = torch.randn(2, 39).numpy()
    acts = []
    for path in (steps[0], steps[1], tmp_path / "run"):
        agent = load_agent(str(path))
        agent.start_trials(2, 0)
        acts.append(agent.act(obs))
    assert (acts[1] == acts[2]).all() and not (acts[0] == acts[2]).all()
    early, final = read_budget(steps[0]), read_budget(tmp_path / "run")
    assert early["optimizer_steps"] == 2 and final["optimizer_steps"] == 4
    assert early["env_steps"] == final["env_steps"] > 0  # the data's cost is in both


def test_normalize_obs_keeps_the_datas_statistics_and_an_init_keeps_its_own(data, tmp_path):
    tiny = dict(steps=2, episodes_per_window=2, batch_size=2, d_model=16, n_layer=1, n_head=2, progress=False,
                tensorboard=False)
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "n"), normalize_obs=True, **tiny))
    cfg = json.loads((tmp_path / "n" / "config.json").read_text())
    obs = np.concatenate([np.asarray(s["obs"]).reshape(-1, 39) for s in load_histories(data).shards])
    # windows overlap episodes, so their statistics weigh steps a little differently from the raw arrays'
    np.testing.assert_allclose(cfg["obs_mean"], obs.mean(0), atol=0.02)
    np.testing.assert_allclose(cfg["obs_std"], np.maximum(obs.std(0, ddof=1), 0.01), atol=0.02, rtol=0.2)
    assert cfg["obs_std"][-3:] == [0.01] * 3  # the hidden goal: constant, floored
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "i"), init_from=str(tmp_path / "n"), **tiny))
    assert json.loads((tmp_path / "i" / "config.json").read_text())["obs_mean"] == cfg["obs_mean"]
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), **tiny))
    assert json.loads((tmp_path / "r" / "config.json").read_text()).get("obs_mean") is None


def test_keep_best_trains_from_a_plain_compact_init_and_needs_the_compact_context(data, tmp_path):
    tiny = dict(steps=2, episodes_per_window=2, batch_size=2, d_model=16, n_layer=1, n_head=2, progress=False,
                tensorboard=False, context_stride=5)
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "plain"), **tiny))
    # the kept best step is a mask, not a weight: a plain compact checkpoint starts a keep-best run
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "best"), init_from=str(tmp_path / "plain"),
                      context_keep_best=True, **tiny))
    cfg = json.loads((tmp_path / "best" / "config.json").read_text())
    assert (cfg["context_stride"], cfg["context_keep_best"]) == (5, True)
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["context_keep_best"] is False
    # a compact run trained on 2-episode windows and acting on 5 episodes embeds only the 2 episode indices it trained
    assert (cfg["max_context_episodes"], cfg["trained_episodes"]) == (2, 2)
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "long"), context_episodes=5, **tiny))
    long = json.loads((tmp_path / "long" / "config.json").read_text())
    assert (long["max_context_episodes"], long["trained_episodes"]) == (5, 2)
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "full"), **{**tiny, "context_stride": 0}))
    assert json.loads((tmp_path / "full" / "config.json").read_text())["trained_episodes"] == 0
    with pytest.raises(UsageError, match="context-keep-best needs the compact context"):
        train(TrainConfig(data=[str(data)], out=str(tmp_path / "bad"), **{**tiny, "context_stride": 0},
                          context_keep_best=True))


def test_heldout_loss_reads_windows_shaped_as_the_runs_training(data, tmp_path):
    """A compact model acting on 5 episodes but trained on 2-episode windows is scored on 2-episode windows from a
    trial's start (the data's trials hold 3 episodes: 5-episode windows do not exist)."""
    from icl_metarl.incontext.train import heldout_loss

    train(TrainConfig(data=[str(data)], out=str(tmp_path / "run"), steps=2, episodes_per_window=2, context_episodes=5,
                      batch_size=2, d_model=16, n_layer=1, n_head=2, progress=False, tensorboard=False,
                      context_stride=5))
    loss = heldout_loss(tmp_path / "run", [str(data)])
    assert np.isfinite(loss) and loss > 0
    assert loss == heldout_loss(tmp_path / "run", [str(data)], episodes_per_window=2)
    assert loss != heldout_loss(tmp_path / "run", [str(data)], episodes_per_window=1)
    with pytest.raises(UsageError, match="no trial has 5 episodes"):
        heldout_loss(tmp_path / "run", [str(data)], episodes_per_window=5)
    # scripts/heldout_loss.py prints and keeps the same figure; a directory that is not a run is one line, exit 2
    script = load_script("heldout_loss")
    out = tmp_path / "h.json"
    assert script.main([str(tmp_path / "run"), "--data", str(data), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["loss"] == loss
    assert script.main([str(tmp_path), "--data", str(data)]) == 2


def test_resuming_a_finished_run_leaves_its_record_and_budget_as_they_were(data, tmp_path, capsys):
    """--resume on a run that already reached its steps trains nothing: its budget.json, training.json (final loss
    included) and weights are left byte for byte, so rerunning a reproduce script does not inflate a run's cost."""
    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), steps=2, episodes_per_window=2, batch_size=2,
                      d_model=16, n_layer=1, n_head=2, progress=False, tensorboard=False, log_every=1)
    first = train(cfg)
    names = ("budget.json", "training.json", "model.safetensors", "train_config.json")
    before = {n: (tmp_path / "run" / n).read_bytes() for n in names}
    assert json.loads(before["training.json"])["final_loss"] == first["loss"]
    again = train(TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert {n: (tmp_path / "run" / n).read_bytes() for n in names} == before
    assert again["loss"] == first["loss"]
    # the command line's entry point says so instead of failing on the missing throughput (session 33's bug)
    train_checkpoint(TrainConfig(**{**cfg.__dict__, "resume": True}), tmp_path / "run")
    assert "nothing trained" in capsys.readouterr().out
    assert {n: (tmp_path / "run" / n).read_bytes() for n in names} == before
