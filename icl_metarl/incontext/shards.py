"""A histories directory on disk: the shard format, its writer's checksums, and the reader.

One directory per shard, one ``.npy`` per field. ``.npy`` is the plainest format numpy can memory-map
(``np.load(mmap_mode="r")``) with no extra dependency and no pickle; one file per field lets a reader
touch only the fields it needs. Each field is written to a temporary name and renamed, with its sha256
for the manifest. Not for: generating or resuming a directory (``histories.py``), or cutting training
windows from one (``windows.py``).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_bytes, read_json
from icl_metarl.harness.suites import TaskSpec, decisions_per_episode

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
# Per-step fields (first axis = steps, trial-major: trial, episode, step) and per-trial fields.
STEP_FIELDS = ("obs", "actions", "expert_actions", "rewards", "successes", "episode", "step")
TRIAL_FIELDS = ("trial_task",)
FIELDS = STEP_FIELDS + TRIAL_FIELDS


# ---------------------------------------------------------------------------------------- writing
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(directory: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write every field of one shard into ``directory``, each atomically; returns each field's sha256."""
    checksums = {}
    for field in FIELDS:
        data = npy_bytes(arrays[field])
        atomic_write_bytes(directory / f"{field}.npy", data)
        checksums[field] = hashlib.sha256(data).hexdigest()
    return checksums


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- loading
def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise UsageError(f"missing {file}: not a histories directory, or its generation never started")
    manifest = read_json(file)
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        got = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise UsageError(f"{file} has schema version {got!r}; this toolkit reads {SCHEMA_VERSION}")
    return manifest


@dataclass
class Histories:
    """A validated histories directory: its manifest and, per shard, its fields memory-mapped on access."""

    path: Path
    manifest: dict
    shards: list[Shard]

    @property
    def episode_length(self) -> int:
        """Simulator steps per episode."""
        return int(self.manifest["settings"]["episode_length"])

    @property
    def action_repeat(self) -> int:
        """The decision interval the trials were played at (1 for data written before the setting)."""
        return int(self.manifest["settings"].get("action_repeat", 1))

    @property
    def decisions(self) -> int:
        """Stored steps (decisions, tokens) per episode."""
        return decisions_per_episode(self.episode_length, self.action_repeat)

    @property
    def tasks(self) -> list:
        return [TaskSpec.from_json(t) for t in self.manifest["tasks"]]

    @property
    def num_steps(self) -> int:
        return sum(int(s["obs"].shape[0]) for s in self.shards)


def load_histories(path: str | Path, verify: bool = True) -> Histories:
    """Open a complete histories directory; with ``verify``, check every file's sha256 against the manifest.

    Any problem (missing or foreign manifest, incomplete run, missing, truncated or edited shard file)
    is a one-line UsageError naming the file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    n = manifest.get("num_shards")
    if not manifest.get("complete") or len(manifest.get("shards", {})) != n:
        raise UsageError(f"{path / MANIFEST} lists {len(manifest.get('shards', {}))} of {n} shards: generation "
                         f"did not finish; rerun the same generate command to complete it")
    shards = []
    for name, record in manifest["shards"].items():
        for field in FIELDS:
            file = path / SHARDS_DIR / name / f"{field}.npy"
            if not file.is_file():
                raise UsageError(f"missing shard file {file}")
            if verify and sha256_file(file) != record["sha256"][field]:
                raise UsageError(f"checksum mismatch in {file}: truncated or edited since generation")
            try:
                rows = _OPEN_MAPS.get(file).shape[0]
            except (ValueError, OSError) as e:
                raise UsageError(f"cannot read {file} as .npy: {e}") from None
            expected = record["trials"] if field in TRIAL_FIELDS else record["steps"]
            if rows != expected:
                raise UsageError(f"{file} holds {rows} rows, the manifest says {expected}")
        shards.append(Shard(path / SHARDS_DIR / name))
    return Histories(path, manifest, shards)


class _MapCache:
    """The memory maps open at once, over every shard of every histories directory: at most ``limit``.

    Each ``np.load(mmap_mode="r")`` holds one file descriptor (Python's mmap keeps a duplicate) for as long
    as the map lives, so mapping every field of every shard up front ran out of descriptors (8 per shard:
    the common limit of 1,024 at about 128 shards, where a full-size ML45 set has thousands). Maps are
    opened on access and the least recently used is dropped past the limit (half the open-file limit, see
    ``_map_limit``; a set larger than that reads random windows about 9x slower, scripts/bench_windows.py,
    so raise ``ulimit -n`` or add DataLoader workers there); an array a caller still holds
    keeps its own map alive. A file replaced since it was mapped (same path, other inode, size or time) is
    mapped again, never served stale.
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit  # None: ``_map_limit()``, decided at the first map, not when the module is imported
        self._maps: OrderedDict[str, tuple[tuple, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, file: Path) -> np.ndarray:
        key, st = str(file), os.stat(file)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if self.limit is None:
                self.limit = _map_limit()
            hit = self._maps.get(key)
            if hit is not None and hit[0] == stamp:
                self._maps.move_to_end(key)
                return hit[1]
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            self._maps[key] = (stamp, array)
            self._maps.move_to_end(key)
            while len(self._maps) > self.limit:
                self._maps.popitem(last=False)
            return array


def _map_limit() -> int:
    """How many memory maps may stay open: half the process's open-file limit, after raising its soft
    limit to the hard one (at most 65,536) where the system allows; 512 where it cannot be read."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        ceiling = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < ceiling:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        return max(64, min(soft, 65536) // 2)
    except (ImportError, ValueError, OSError):
        return 512


_OPEN_MAPS = _MapCache()


class Shard(Mapping):
    """One shard's fields by name (``shard["obs"]``), each a read-only memory map opened on access."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __getitem__(self, field: str) -> np.ndarray:
        if field not in FIELDS:
            raise KeyError(field)
        return _OPEN_MAPS.get(self.directory / f"{field}.npy")

    def __iter__(self) -> Iterator[str]:
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)
