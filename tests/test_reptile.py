"""Reptile against its update written out by hand, inner SGD and inner Adam (torch.optim.Adam as reference)."""

import contextlib
import dataclasses

import pytest
import torch

from gradient_meta.config import MetaRLConfig, SinusoidConfig
from gradient_meta.reptile import Reptile, ReptileConfig, adam_train, reptile_direction
from gradient_meta.sinusoid import train
from icl_metarl.harness.errors import UsageError
from icl_metarl.study.cli import main
from tests.test_maml import _sgd_by_hand, _tasks, linear_loss

torch.set_num_threads(1)


def test_sgd_reptile_matches_textbook():
    (xs, ys), _, w = _tasks()
    k, lr, eps = 3, 0.05, 0.5
    learner = Reptile({"w": w}, linear_loss, ReptileConfig(inner_steps=k, inner_lr=lr, meta_lr=eps))
    learner.step((xs, ys))
    # Nichol et al. 2018, Algorithm 2: phi_i = k SGD steps from w; w <- w + eps * mean_i(phi_i - w).
    phis = []
    for i in range(len(xs)):
        phi = w.clone()
        for _ in range(k):
            phi = phi - lr * 2 / len(xs[i]) * xs[i].T @ (xs[i] @ phi - ys[i])
        phis.append(phi)
    expected = w + eps * (torch.stack(phis).mean(0) - w)
    torch.testing.assert_close(learner.params["w"].detach(), expected, atol=1e-12, rtol=1e-10)


def test_inner_adam_matches_torch_optim_adam():
    (xs, ys), _, w = _tasks()
    got = adam_train(linear_loss, {"w": w}, (xs[0], ys[0]), steps=4, lr=0.1, betas=(0.5, 0.9))["w"]
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.Adam([ref], lr=0.1, betas=(0.5, 0.9), eps=1e-8)
    for _ in range(4):
        opt.zero_grad()
        linear_loss({"w": ref}, (xs[0], ys[0])).backward()
        opt.step()
    torch.testing.assert_close(got, ref.detach(), atol=1e-12, rtol=1e-10)


def test_adam_reptile_averages_adapted_weights():
    (xs, ys), _, w = _tasks()
    cfg = ReptileConfig(inner_steps=2, inner_lr=0.1, inner_optimizer="adam", meta_lr=1.0)
    learner = Reptile({"w": w}, linear_loss, cfg)
    learner.step((xs, ys))
    phis = [adam_train(linear_loss, {"w": w}, (xs[i], ys[i]), 2, 0.1, cfg.adam_betas)["w"] for i in range(len(xs))]
    # meta_lr 1 with SGD puts the initialisation exactly at the mean adapted weights
    torch.testing.assert_close(learner.params["w"].detach(), torch.stack(phis).mean(0), atol=1e-12, rtol=1e-10)


def test_config_rejects_bad_values():
    with pytest.raises(UsageError, match="inner steps"):
        ReptileConfig(inner_steps=0)
    with pytest.raises(UsageError, match="inner_lr"):
        ReptileConfig(inner_lr=-0.1)
    with pytest.raises(UsageError, match="unknown inner optimizer 'rmsprop'"):
        ReptileConfig(inner_optimizer="rmsprop")


@pytest.mark.parametrize("steps", [None, 0, 2])
def test_adapt_takes_exactly_the_steps_asked(steps):
    """``adapt(steps=0)`` is no step (the initialisation per task), None the configured k = 3."""
    (xs, ys), _, w = _tasks()
    learner = Reptile({"w": w}, linear_loss, ReptileConfig(inner_steps=3, inner_lr=0.05))
    want = _sgd_by_hand(w, (xs, ys), 0.05, 3 if steps is None else steps)
    torch.testing.assert_close(learner.adapt((xs, ys), steps)["w"], want, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------- Reptile needs k >= 2
def test_one_inner_step_is_the_multitask_gradient_so_it_is_refused():
    """Why k >= 2 (Nichol et al. 2018, sec. 5): with k = 1, theta - phi is lr times the task gradient, so the
    Reptile direction is lr x the multi-task gradient; with k = 2 it is not."""
    (xs, ys), _, w = _tasks()
    multitask = torch.stack([torch.func.grad(linear_loss)({"w": w}, (xs[i], ys[i]))["w"] for i in range(len(xs))])
    one = ReptileConfig(inner_steps=2, inner_lr=0.05)
    one.inner_steps = 1  # past the check, to show what it guards against
    d1, _ = reptile_direction(linear_loss, {"w": w}, (xs, ys), one)
    torch.testing.assert_close(d1["w"], 0.05 * multitask.mean(0), atol=1e-12, rtol=1e-10)
    d2, _ = reptile_direction(linear_loss, {"w": w}, (xs, ys), ReptileConfig(inner_steps=2, inner_lr=0.05))
    assert not torch.allclose(d2["w"], 2 * 0.05 * multitask.mean(0), atol=1e-6)
    with pytest.raises(UsageError, match=r"^reptile needs inner steps >= 2, got 1: "):
        ReptileConfig(inner_steps=1)


@pytest.mark.parametrize("build", [lambda: ReptileConfig(inner_steps=1),
                                   lambda: MetaRLConfig(algo="reptile", inner_steps=1),
                                   lambda: train(SinusoidConfig(algo="reptile", inner_steps=1, iterations=1))])
def test_fewer_than_two_inner_steps_is_one_line_naming_the_value(build):
    with pytest.raises(UsageError) as e:
        build()
    assert "reptile needs inner steps >= 2, got 1" in str(e.value) and "\n" not in str(e.value)


TINY_RL = ["--iterations", "1", "--meta-batch", "1", "--episode-length", "5", "--hidden", "4"]  # were it to run


@pytest.mark.parametrize("argv", [["train", "reptile", "--inner-steps", "1", *TINY_RL],
                                  ["meta-train", "--algo", "reptile", "--inner-steps", "1", *TINY_RL],
                                  ["fewshot", "sinusoid", "train", "--algo", "reptile", "--inner-steps", "1",
                                   "--iterations", "1"]])
def test_the_command_line_exits_2_on_one_inner_step(argv, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "reptile needs inner steps >= 2, got 1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_reptile_defaults_to_k_of_at_least_two_and_no_query_episodes():
    reptile = MetaRLConfig(algo="reptile").resolved()
    assert reptile.inner_steps >= 2 and reptile.query_episodes == 0
    maml = MetaRLConfig(algo="maml").resolved()
    assert (maml.inner_steps, maml.query_episodes) == (1, 1)  # MAML-RL's, unchanged
    assert MetaRLConfig(algo="meta-sgd").resolved().inner_steps == 1
    # a study lays the algorithm over a base run (dataclasses.replace): it still gets Reptile's values
    laid = dataclasses.replace(MetaRLConfig(algo="maml", iterations=3), algo="reptile").resolved()
    assert (laid.inner_steps, laid.query_episodes) == (reptile.inner_steps, 0)
    assert SinusoidConfig(algo="reptile").inner_steps >= 2 and SinusoidConfig(algo="maml").inner_steps == 1
    with pytest.raises(UsageError, match="reptile plays no query episodes.*got 1"):
        MetaRLConfig(algo="reptile", query_episodes=1)
    with pytest.raises(UsageError, match="query-episodes must be an integer >= 1, got 0"):
        MetaRLConfig(algo="maml", query_episodes=0)


def test_a_task_whose_inner_steps_diverge_is_left_out_of_the_update():
    """Policy-gradient inner steps after the first are unclipped importance weights and can overflow: such a task
    drops out of the mean (the update is the other tasks' Reptile move), and if all diverge nothing moves."""
    (xs, ys), _, w = _tasks()
    cfg = ReptileConfig(inner_steps=2, inner_lr=0.05, meta_lr=0.5)
    bad_xs = xs.clone()
    bad_xs[1] = float("inf")  # task 1's gradient is non-finite from its first step
    learner = Reptile({"w": w}, linear_loss, cfg)
    with pytest.warns(RuntimeWarning, match="1 of 4 tasks. inner steps diverged"):
        loss = learner.step((bad_xs, ys))
    assert len(xs) == 4 and torch.isfinite(torch.tensor(loss))
    keep = torch.tensor([0, 2, 3])
    reference = Reptile({"w": w}, linear_loss, cfg)
    reference.step((xs[keep], ys[keep]))
    torch.testing.assert_close(learner.params["w"].detach(), reference.params["w"].detach(), atol=1e-12, rtol=1e-10)
    d, losses = reptile_direction(linear_loss, {"w": w}, (torch.full_like(xs, float("inf")), ys), cfg)
    assert torch.equal(d["w"], torch.zeros_like(w)) and bool(torch.isnan(losses).all())


def _two_process_diverged_step(out_dir):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    (xs, ys), _, w = _tasks()
    xs = xs.clone()
    xs[1] = float("inf")  # process 0 keeps 1 of its 2 tasks, process 1 both of its own
    mine = slice(2 * acc.process_index, 2 * acc.process_index + 2)
    learner = Reptile({"w": w}, linear_loss, ReptileConfig(inner_steps=2, inner_lr=0.05, meta_lr=0.5), acc)
    with pytest.warns(RuntimeWarning) if acc.process_index == 0 else contextlib.nullcontext():
        learner.step((xs[mine], ys[mine]))
    if acc.is_main_process:
        torch.save(learner.params["w"].detach(), out_dir / "two.pt")


# two gloo processes, ~8 s: the file's multi-process representative in the default suite
def test_two_processes_with_a_diverged_task_equal_one_on_the_kept_tasks(tmp_path):
    """Processes that keep different numbers of tasks are weighted by them: the update is the one-process
    Reptile step on the three finite tasks, not the mean of the two processes' means."""
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's one-process state is not forked
    debug_launcher(_two_process_diverged_step, args=(tmp_path,), num_processes=2)
    (xs, ys), _, w = _tasks()
    keep = torch.tensor([0, 2, 3])
    reference = Reptile({"w": w}, linear_loss, ReptileConfig(inner_steps=2, inner_lr=0.05, meta_lr=0.5))
    reference.step((xs[keep], ys[keep]))
    torch.testing.assert_close(torch.load(tmp_path / "two.pt"), reference.params["w"].detach(), atol=1e-10, rtol=1e-8)
