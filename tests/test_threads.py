"""Torch's CPU thread count (harness/threads.py): the command line sets it once, library calls leave it alone."""

import pytest
import torch

from gradient_meta import sinusoid
from gradient_meta.config import MetaRLConfig, SinusoidConfig
from gradient_meta.meta_rl import meta_train
from icl_metarl.fewshot.config import FewShotTrainConfig
from icl_metarl.fewshot.train import train_regressor
from icl_metarl.harness import registry
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.threads import threads_held, use_threads
from icl_metarl.study import cli
from icl_metarl.study.config import STAGES, preset
from icl_metarl.study.quickstart import stage_threads

#: a count no command uses by default, so that a library call that sets its own shows
ODD = 3


@pytest.fixture
def threads():
    """Torch's thread count put back after the test, whatever the test sets."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_use_threads_sets_them_and_zero_leaves_them(threads):
    use_threads(ODD)
    assert torch.get_num_threads() == ODD
    for leave in (0, None):
        use_threads(leave)
        assert torch.get_num_threads() == ODD
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError, match=f"threads must be an integer >= 0 .*got {bad!r}"):
            use_threads(bad)


def test_threads_held_puts_them_back_after_the_block_even_on_an_error(threads):
    use_threads(ODD)
    with threads_held(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == ODD
    with pytest.raises(RuntimeError), threads_held(2):
        raise RuntimeError
    assert torch.get_num_threads() == ODD
    with threads_held(0):
        assert torch.get_num_threads() == ODD


@pytest.mark.parametrize("train", [
    lambda out: sinusoid.train(SinusoidConfig(iterations=1, meta_batch=2, hidden=4, threads=1), log=lambda m: None),
    lambda out: train_regressor(FewShotTrainConfig(family="linear", max_shots=4, icl_steps=1, icl_batch=2, icl_queries=2,
                                                   d_model=8, n_layer=1, n_head=2, threads=1), out, log=lambda m: None),
    lambda out: meta_train(MetaRLConfig(iterations=1, meta_batch=2, episode_length=4, hidden=(4,)), out,
                           progress=False),
], ids=["sinusoid", "fewshot-regressor", "meta-rl"])
def test_training_leaves_torchs_threads_alone(threads, tmp_path, train):
    """Each of these set torch's threads for the whole process before (1 here), whoever called it."""
    use_threads(ODD)
    train(tmp_path / "run")
    assert torch.get_num_threads() == ODD


@pytest.fixture
def trained(monkeypatch):
    """``registry.train`` recording the thread count each command trains with, and training nothing."""
    seen = []
    monkeypatch.setattr(registry, "train", lambda name, config, out: seen.append((name, torch.get_num_threads())))
    return seen


@pytest.mark.parametrize("argv,want", [
    (["meta-train", "--algo", "reptile"], 1),  # the gradient learners' own count
    (["train", "maml"], 1),
    (["train", "meta-sgd", "--threads", "2"], 2),
    (["meta-train", "--threads", "2"], 2),
])
def test_the_command_line_sets_each_commands_threads(threads, trained, tmp_path, argv, want):
    use_threads(ODD)
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    assert trained == [(argv[1] if argv[0] == "train" else ("reptile" if "reptile" in argv else "maml"), want)]


def test_a_learner_with_its_own_threads_setting_takes_it_from_there(threads, trained, tmp_path):
    use_threads(ODD)
    assert cli.main(["train", "icl", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--threads", "2"]) == 0
    assert trained == [("icl", 2)]
    assert cli.main(["train", "icl", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 0  # 0: left
    assert trained[-1] == ("icl", 2)


def test_bad_threads_are_one_line_errors(threads, trained, tmp_path, capsys):
    assert cli.main(["train", "maml", "--threads", "-2", "--out", str(tmp_path)]) == 2
    assert "threads must be an integer >= 0 (0: torch's default), got -2" in capsys.readouterr().err
    assert trained == []


def test_each_quickstart_stage_runs_with_its_own_commands_threads():
    cfg = preset("tiny")
    assert {s: stage_threads(cfg, s) for s in STAGES} == {
        "generate": 0, "pretrain": cfg.torch_threads, "meta-train": 1, "evaluate": 1,
        "probe": cfg.probe.torch_threads, "report": 0}
    cfg.torch_threads, cfg.pretrain.threads = 0, 2  # the pretrain section's own setting comes first
    assert stage_threads(cfg, "pretrain") == 2
