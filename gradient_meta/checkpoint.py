"""Checkpoints of a gradient meta-learner: weights (and Meta-SGD step sizes) in safetensors, config in JSON.

Nothing here unpickles; a directory holds ``model.safetensors`` and ``config.json``, written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_bytes, atomic_write_json, versions

WEIGHTS, CONFIG = "model.safetensors", "config.json"
PARAM, STEP = "params.", "step_size."


def save_checkpoint(out: str | Path, params: dict[str, torch.Tensor], step_sizes: dict[str, torch.Tensor] | None,
                    config: dict) -> Path:
    """Write ``out/model.safetensors`` (``params.*``, ``step_size.*``) and ``out/config.json``."""
    out = Path(out)
    tensors = {PARAM + k: v.detach().cpu().contiguous() for k, v in params.items()}
    tensors.update({STEP + k: v.detach().cpu().contiguous() for k, v in (step_sizes or {}).items()})
    atomic_write_bytes(out / WEIGHTS, st_save(tensors))
    atomic_write_json(out / CONFIG, {**config, "learned_step_sizes": bool(step_sizes), "versions": versions()})
    return out


def load_checkpoint(path: str | Path) -> tuple[dict, dict | None, dict]:
    """(params, step sizes or None, config) from a directory written by ``save_checkpoint``."""
    path = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise UsageError(f"checkpoint {str(path)!r} has no {name}; expected a directory written by "
                             f"`icl-metarl fewshot sinusoid train`")
    try:
        config = json.loads((path / CONFIG).read_text())
        tensors = st_load((path / WEIGHTS).read_bytes())
    except (json.JSONDecodeError, Exception) as e:  # safetensors raises its own error types
        raise UsageError(f"checkpoint {str(path)!r} cannot be read: {e}") from None
    params = {k[len(PARAM):]: v for k, v in tensors.items() if k.startswith(PARAM)}
    steps = {k[len(STEP):]: v for k, v in tensors.items() if k.startswith(STEP)}
    return params, (steps or None), config
