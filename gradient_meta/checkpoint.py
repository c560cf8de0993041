"""The checkpoint a gradient meta-learner is loaded from: weights (and Meta-SGD step sizes, and whatever
else its learner keeps beside them, e.g. observation statistics) in safetensors, its config in JSON.

A directory holds ``model.safetensors`` (``params.*``, ``step_size.*``, others as given) and ``config.json``,
each written atomically through ``icl_metarl.harness.checkpoint``. Not for: resumable training state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from icl_metarl.harness.checkpoint import load_json, load_tensors, save_tensors
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_json, versions

WEIGHTS, CONFIG = "model.safetensors", "config.json"
PARAM, STEP = "params.", "step_size."


def save_checkpoint(out: str | Path, params: dict[str, torch.Tensor], step_sizes: dict[str, torch.Tensor] | None,
                    config: dict, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``out/model.safetensors`` (``params.*``, ``step_size.*``, then ``extra`` as named) and
    ``out/config.json`` (``config`` with ``learned_step_sizes`` and ``versions``)."""
    out = Path(out)
    tensors = {PARAM + k: v for k, v in params.items()}
    tensors.update({STEP + k: v for k, v in (step_sizes or {}).items()})
    tensors.update(extra or {})
    save_tensors(out / WEIGHTS, tensors)
    atomic_write_json(out / CONFIG, {**config, "learned_step_sizes": bool(step_sizes), "versions": versions()})
    return out


def load_checkpoint(path: str | Path, written_by: str = "`icl-metarl fewshot sinusoid train`"
                    ) -> tuple[dict, dict | None, dict, dict]:
    """(params, step sizes or None, config, the other tensors) from a directory written by ``save_checkpoint``;
    a missing or damaged file is a one-line UsageError that names ``written_by``, the command that makes one."""
    path = Path(path)
    missing = [name for name in (WEIGHTS, CONFIG) if not (path / name).is_file()]
    if missing:
        raise UsageError(f"checkpoint {str(path)!r} has no {' or '.join(missing)}; expected a directory written "
                         f"by {written_by}")
    config = load_json(path / CONFIG)
    tensors, _ = load_tensors(path / WEIGHTS)
    params = {k[len(PARAM):]: v for k, v in tensors.items() if k.startswith(PARAM)}
    steps = {k[len(STEP):]: v for k, v in tensors.items() if k.startswith(STEP)}
    rest = {k: v for k, v in tensors.items() if not k.startswith((PARAM, STEP))}
    return params, (steps or None), config, rest
