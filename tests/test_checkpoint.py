"""The shared checkpoint mechanics (harness/checkpoint.py): round trips equal the original, a damaged file is
one line naming it, and a write killed part-way leaves the previous checkpoint whole."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from icl_metarl.harness.checkpoint import (
    atomic_directory,
    complete_checkpoints,
    keep_last,
    load_json,
    load_optimizer,
    load_tensors,
    optimizer_tensors,
    save_tensors,
    step_dir,
    write_on_main,
)
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import as_json


def _trained_adam(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def _steps(model, optimizer, n=2):
    """``n`` more updates from the same data: the parameters they end at."""
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(5, 3, generator=g)).pow(2).mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_optimizer_and_generator_round_trip_equal_the_original(tmp_path):
    model, optimizer = _trained_adam()
    generator = torch.Generator().manual_seed(3)
    torch.rand(10, generator=generator)
    tensors, meta = optimizer_tensors(optimizer, "optim.")
    save_tensors(tmp_path / "state.safetensors", {**tensors, "rng": generator.get_state()},
                 {"optimizer": json.dumps(meta)})

    read, strings = load_tensors(tmp_path / "state.safetensors")
    other, restored = _trained_adam(seed=1)  # other weights and moments, overwritten below
    other.load_state_dict(model.state_dict())
    load_optimizer(restored, read, json.loads(strings["optimizer"])["param_groups"], "optim.")
    again = torch.Generator()
    again.set_state(read["rng"])

    want, got = optimizer.state_dict(), restored.state_dict()
    # the groups as JSON has them (betas read back as a list, as they always did)
    assert as_json(want["param_groups"]) == got["param_groups"] and want["state"].keys() == got["state"].keys()
    for i, state in want["state"].items():
        assert all(torch.equal(v, got["state"][i][k]) for k, v in state.items())
    assert torch.equal(again.get_state(), generator.get_state())
    assert torch.equal(torch.rand(5, generator=again), torch.rand(5, generator=generator))
    # resumed and uninterrupted runs take bit-identical next steps
    assert all(torch.equal(a, b) for a, b in zip(_steps(model, optimizer), _steps(other, restored)))


def test_optimizer_split_is_tensors_plus_json():
    _, optimizer = _trained_adam()
    tensors, meta = optimizer_tensors(optimizer, "state.")
    assert set(tensors) == {f"state.{i}.{n}" for i in range(4) for n in ("step", "exp_avg", "exp_avg_sq")}
    assert meta["state"]["0"] == ["step", "exp_avg", "exp_avg_sq"]
    json.dumps(meta)  # the rest is plain JSON


@pytest.mark.parametrize("damage", ["missing", "cut", "garbage", "empty"])
def test_a_missing_or_damaged_tensor_file_is_one_line_naming_it(tmp_path, damage):
    path = tmp_path / "state.safetensors"
    save_tensors(path, {"a": torch.arange(100.0)})
    if damage == "missing":
        path.unlink()
    elif damage == "cut":
        path.write_bytes(path.read_bytes()[:-17])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file at all")
    else:
        path.write_bytes(b"")
    with pytest.raises(UsageError) as e:
        load_tensors(path, "training state")
    message = str(e.value)
    assert message.startswith("training state") and str(path) in message and "\n" not in message


def test_a_missing_or_damaged_json_is_one_line_naming_it(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_json(tmp_path / "trainer_state.json")
    (tmp_path / "trainer_state.json").write_text('{"step": 4, "param')
    with pytest.raises(UsageError, match="trainer_state.json is not valid JSON") as e:
        load_json(tmp_path / "trainer_state.json")
    assert "\n" not in str(e.value)


def test_metadata_round_trips_and_none_is_empty(tmp_path):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(2)}, {"iteration": "4"})
    save_tensors(tmp_path / "b.safetensors", {"x": torch.ones(2)})
    assert load_tensors(tmp_path / "a.safetensors")[1] == {"iteration": "4"}
    assert load_tensors(tmp_path / "b.safetensors")[1] == {}


def _write(root, step, value):
    with atomic_directory(step_dir(root, step)) as tmp:
        save_tensors(tmp / "model.safetensors", {"w": torch.full((3,), float(value))})
        (tmp / "done.json").write_text("{}")


def test_checkpoints_are_listed_oldest_first_and_pruned(tmp_path):
    for step in (10, 2, 30):
        _write(tmp_path, step, step)
    (tmp_path / ".tmp-step-00000040").mkdir()  # a write a kill interrupted
    (tmp_path / "step-00000050").mkdir()  # a directory without its last file
    assert [p.name for p in complete_checkpoints(tmp_path, "done.json")] == \
        ["step-00000002", "step-00000010", "step-00000030"]
    keep_last(tmp_path, "done.json", 2)
    assert [p.name for p in complete_checkpoints(tmp_path, "done.json")] == ["step-00000010", "step-00000030"]
    keep_last(tmp_path, "done.json", 0)  # 0 keeps every one
    assert len(complete_checkpoints(tmp_path, "done.json")) == 2


def test_rewriting_a_checkpoint_replaces_it_whole(tmp_path):
    _write(tmp_path, 4, 1.0)
    _write(tmp_path, 4, 2.0)
    assert torch.equal(load_tensors(step_dir(tmp_path, 4) / "model.safetensors")[0]["w"], torch.full((3,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


KILLED_WRITER = """
import os, signal, sys, torch
from icl_metarl.harness.checkpoint import atomic_directory, save_tensors
with atomic_directory(sys.argv[1]) as tmp:
    save_tensors(tmp / "model.safetensors", {"w": torch.zeros(3)})
    os.kill(os.getpid(), signal.SIGKILL)  # killed before the block ends
"""


def test_a_killed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    _write(tmp_path, 4, 1.0)
    before = (step_dir(tmp_path, 4) / "model.safetensors").read_bytes()
    for target in (step_dir(tmp_path, 4), step_dir(tmp_path, 8)):  # over the old one, and a new one
        r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], env={**os.environ})
        assert r.returncode == -signal.SIGKILL
        assert (step_dir(tmp_path, 4) / "model.safetensors").read_bytes() == before
        assert [p.name for p in complete_checkpoints(tmp_path, "done.json")] == ["step-00000004"]
    _write(tmp_path, 8, 3.0)  # the next write clears what the killed one left
    assert [p.name for p in complete_checkpoints(tmp_path, "done.json")] == ["step-00000004", "step-00000008"]


class _Processes:
    """Two processes' view of the barrier, played in this one: who writes, and when the waits happen."""

    def __init__(self, main):
        self.is_main_process, self.events = main, []

    def wait_for_everyone(self):
        self.events.append("wait")


def test_only_the_main_process_writes_between_barriers():
    for main, want in ((True, ["wait", "write", "wait"]), (False, ["wait", "wait"])):
        acc = _Processes(main)
        write_on_main(acc, lambda a=acc: a.events.append("write"))
        assert acc.events == want
    ran = []
    write_on_main(None, lambda: ran.append(1))
    assert ran == [1]
