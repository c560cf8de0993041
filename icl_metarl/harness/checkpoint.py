"""Checkpoints of every learner: tensors in safetensors, the rest in JSON, directories published by one rename.

The mechanics only (what a file holds is its learner's business): a directory written under a temporary
sibling and renamed, so a kill leaves the previous checkpoint whole; an optimizer's state split into tensors
and JSON; readers that turn a missing or damaged file into one line naming it. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_bytes, read_json

STEP_PREFIX = "step-"


# ----------------------------------------------------------------------------------- directories
def step_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``: ``root/step-00000012``."""
    return Path(root) / f"{STEP_PREFIX}{step:08d}"


def temporary_sibling(path: Path) -> Path:
    """The name ``path`` is written under until it is complete; no reader ever lists it."""
    return path.with_name(f".tmp-{path.name}")


def fresh_directory(path: Path) -> Path:
    """``path`` as an empty directory (what a killed write left there goes)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish(tmp: Path, path: Path) -> None:
    """Make the complete directory ``tmp`` into ``path`` by renames, replacing what ``path`` held."""
    if path.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
        old = path.with_name(f".old-{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Write a checkpoint directory: the block fills the empty temporary sibling it is given, and when the
    block ends without error one rename makes it ``path``. A kill inside the block leaves ``path`` as it was."""
    path = Path(path)
    tmp = fresh_directory(temporary_sibling(path))
    yield tmp
    publish(tmp, path)


def complete_checkpoints(root: Path, marker: str) -> list[Path]:
    """The ``step-*`` directories under ``root`` that hold ``marker`` (their last file), oldest first; a
    temporary one never counts."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / marker).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def keep_last(root: Path, marker: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints under ``root`` (``keep`` <= 0: keep all)."""
    for old in complete_checkpoints(root, marker)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_on_main(accelerator, write: Callable[[], None]) -> None:
    """Every process waits for the others, the main process alone runs ``write``, and all wait for it: a
    file several processes contribute to is written once, after the last contribution (no accelerator: one
    process, ``write`` runs)."""
    if accelerator is None:
        write()
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write()
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------- tensors
def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` (and string ``metadata``) as one safetensors file, atomically."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(data, metadata))


def load_tensors(path: str | Path, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; a missing, cut or damaged one is a one-line UsageError
    naming ``what`` and the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 length, JSON
    except FileNotFoundError:
        raise UsageError(f"{what} {str(path)!r} does not exist") from None
    except Exception as e:  # OSError, or safetensors' own error types for a cut or foreign file
        raise UsageError(f"{what} {str(path)!r} cannot be read: {_one_line(e)}") from None
    return tensors, header.get("__metadata__") or {}


def load_json(path: str | Path, what: str = "checkpoint") -> dict:
    """A checkpoint's JSON file; missing or not JSON is a one-line UsageError naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    try:
        return read_json(path)
    except UsageError as e:
        raise UsageError(f"{what} {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ------------------------------------------------------------------------------------- optimizer
def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict split into tensors ``{prefix}{param index}.{name}`` (Adam's moments and step)
    and JSON: ``{"param_groups": ..., "state": {index: [names]}}``."""
    sd = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        meta["state"][str(idx)] = list(state)
        for name, value in state.items():
            tensors[f"{prefix}{idx}.{name}"] = value.detach().clone().contiguous()
    return tensors, meta


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list,
                   prefix: str) -> None:
    """Restore what ``optimizer_tensors`` split: the state from the tensors under ``prefix`` (other keys are
    ignored), the groups from the JSON."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
