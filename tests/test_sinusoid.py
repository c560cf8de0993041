"""The sinusoid task family, its evaluation, the command line and data-parallel training."""

import json
import math

import pytest
import torch
from torch.func import functional_call

from gradient_meta.sinusoid import (
    SineNet,
    SinusoidConfig,
    evaluate,
    learned_step_size,
    mse_loss_fn,
    sample_points,
    sample_tasks,
    train,
)
from icl_metarl.harness.errors import UsageError
from icl_metarl.study.cli import main

torch.set_num_threads(1)


def test_tasks_and_points_follow_the_papers_ranges():
    g = torch.Generator().manual_seed(0)
    amp, phase = sample_tasks(500, g)
    assert amp.min() >= 0.1 and amp.max() <= 5.0 and phase.min() >= 0 and phase.max() <= math.pi
    x, y = sample_points(amp, phase, 7, g)
    assert x.shape == y.shape == (500, 7, 1) and x.min() >= -5 and x.max() <= 5
    i = 3
    torch.testing.assert_close(y[i, :, 0], amp[i] * torch.sin(x[i, :, 0] - phase[i]))


def test_evaluate_matches_a_per_task_loop():
    torch.manual_seed(0)
    model = SineNet()
    params = {k: v.detach() for k, v in model.named_parameters()}
    res = evaluate(model, params, 0.05, shots=5, steps=1, n_tasks=20, n_query=30, seed=7)
    # second way: regenerate the same tasks, adapt each with autograd, score in a loop
    g = torch.Generator().manual_seed(7)
    amp, phase = sample_tasks(20, g)
    sx, sy = sample_points(amp, phase, 5, g)
    qx, qy = sample_points(amp, phase, 30, g)
    loss = mse_loss_fn(model)
    errs = []
    for i in range(20):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss(p, (sx[i], sy[i])), list(p.values()))
        p = {k: (v - 0.05 * gk).detach() for (k, v), gk in zip(p.items(), grads)}
        errs.append(float(((functional_call(model, p, (qx[i],)) - qy[i]) ** 2).mean()))
    errs = torch.tensor(errs)
    assert res["mse"] == pytest.approx(float(errs.mean()), rel=1e-5)
    assert res["ci95"] == pytest.approx(1.96 * float(errs.std()) / math.sqrt(20), rel=1e-4)


def test_meta_sgd_training_beats_its_initialisation():
    cfg = SinusoidConfig(algo="meta-sgd", shots=10, iterations=150, log_every=0)
    model, learner, _ = train(cfg)
    before = evaluate(SineNet(), dict(SineNet().named_parameters()), 0.01, 10, 1, n_tasks=300)
    after = evaluate(model, learner.params, learned_step_size(cfg, learner), 10, 1, n_tasks=300)
    assert after["mse"] + after["ci95"] + before["ci95"] < before["mse"]


def test_config_rejects_bad_values():
    with pytest.raises(UsageError, match="unknown algorithm 'mamal'"):
        SinusoidConfig(algo="mamal")
    with pytest.raises(UsageError, match="shots must be >= 1"):
        SinusoidConfig(shots=0)
    with pytest.raises(UsageError, match="inner steps"):
        train(SinusoidConfig(inner_steps=0, iterations=1))


def test_cli_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["fewshot", "sinusoid", "train", "--out", str(out), "--algo", "meta-sgd", "--iterations", "5",
                 "--meta-batch", "4", "--eval-tasks", "10"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "sinusoid" and cfg["learned_step_sizes"] and cfg["config"]["meta_batch"] == 4
    assert main(["fewshot", "sinusoid", "evaluate", str(out), "--shots", "5", "--tasks", "20"]) == 0
    assert "meta-sgd K=5, 1 step(s): test MSE" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["fewshot", "sinusoid", "train", "--out", str(tmp_path / "x"), "--inner-steps", "0"]) == 2
    assert main(["fewshot", "sinusoid", "train", "--out", str(tmp_path / "x"), "--inner-lr", "-0.1"]) == 2
    assert main(["fewshot", "sinusoid", "evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "inner steps must be an integer >= 1, got 0" in err and "inner_lr must be a finite number > 0" in err


def _two_process_training(out_dir):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    _, learner, _ = train(SinusoidConfig(algo="maml", iterations=3, meta_batch=4, log_every=0), acc)
    if acc.is_main_process:
        torch.save({k: v.detach() for k, v in learner.params.items()}, out_dir / "two.pt")


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """Each of 2 gloo processes takes half of the meta-batch; the all-reduced result equals 1 process."""
    from accelerate import debug_launcher

    debug_launcher(_two_process_training, args=(tmp_path,), num_processes=2)
    two = torch.load(tmp_path / "two.pt")
    _, one, _ = train(SinusoidConfig(algo="maml", iterations=3, meta_batch=4, log_every=0))
    for k, v in one.params.items():
        torch.testing.assert_close(two[k], v.detach(), atol=1e-6, rtol=1e-5)


def test_cli_table_trains_each_algorithm_at_each_k_and_reports_earlier_runs(tmp_path, capsys):
    argv = ["fewshot", "sinusoid", "table", "--shots", "2", "3", "--algos", "maml", "meta-sgd", "--iterations", "2",
            "--eval-tasks", "4", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["algo"], r["shots"]) for r in rows] == [("maml", 2), ("meta-sgd", 2), ("maml", 3), ("meta-sgd", 3)]
    assert (tmp_path / "meta-sgd-k3" / "config.json").is_file()
    table = capsys.readouterr().out.split("| method |")[1]
    assert main(["fewshot", "sinusoid", "table", "--report", str(tmp_path / "results.json")]) == 0
    assert capsys.readouterr().out.split("| method |")[1] == table
    assert "| meta-sgd | " in table and "0.90 ± 0.16" not in table  # the paper has no K = 2 or 3
