"""Files that survive a crash (write to a temporary name, then rename), logs read back after one, and the
provenance stamped on them.

Every JSON, shard and checkpoint this toolkit writes goes through here or through the same pattern.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from importlib import metadata
from pathlib import Path

from icl_metarl.harness.errors import UsageError


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_figure(fig, path: str | Path, **savefig) -> None:
    """A matplotlib figure as PNG at ``path``, atomically (``savefig``: e.g. dpi, bbox_inches)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def as_json(value):
    """``value`` as it reads back from a JSON file (tuples become lists): the form in which settings
    written to disk are compared with the settings of a rerun."""
    return json.loads(json.dumps(value))


def read_json(path: str | Path):
    """The JSON value in ``path`` (gzip-compressed if its name ends in ``.gz``); a file that is not JSON is a
    one-line UsageError naming it."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt") as f:
                return json.load(f)
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log, one per line, in order; none if there is no file.

    A training loop appends one line per record, so a kill can cut only the last line short: that line
    is left out (its step is redone on resume). A line before it that is not JSON is a UsageError naming
    the file and the line.
    """
    return [record for _, record in _log_lines(Path(path))]


def trim_log(path: str | Path, step: int, key: str = "step") -> None:
    """Keep the records of a JSON-lines log up to ``step`` (their ``key`` field), each line as it was: a
    run resuming from the checkpoint of ``step`` drops what it logged after it, and a last line a kill cut
    short. No file: nothing to do."""
    path = Path(path)
    if path.exists():
        kept = [line for line, record in _log_lines(path) if record[key] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _log_lines(path: Path) -> list[tuple[str, dict]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if number == len(lines):  # cut short by a kill mid-write
                break
            raise UsageError(f"{path}, line {number}, is not valid JSON: {e}") from None
    return out


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    out = {}
    for name in ("icl-metarl", "metaworld", "mujoco", "gymnasium", "torch", "transformers", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
