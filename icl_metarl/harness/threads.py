"""Torch's CPU thread count: chosen by the command that runs, never changed as a side effect of a library call.

A command line sets it once for its process (``use_threads``, from its ``--threads``); a block that needs
its own count for a while (a stage of the quickstart, one step of the in-context agent) holds it with
``threads_held`` and puts it back. Library functions leave it alone, so calling one from Python (a test,
a notebook, another command) does not change how everything after it runs. Not for: choosing the count
(each command's settings say what suits it; docs/benchmarks.md has the measurements).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from icl_metarl.harness.errors import UsageError


def _check(threads: int | None) -> int:
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UsageError(f"threads must be an integer >= 0 (0: torch's default), got {threads!r}")
    return threads


def use_threads(threads: int | None) -> None:
    """Torch's intra-op CPU threads for the rest of this process (0 or None: leave torch's setting)."""
    if _check(threads):
        torch.set_num_threads(threads)


@contextmanager
def threads_held(threads: int | None) -> Iterator[None]:
    """Torch's intra-op CPU threads set to ``threads`` inside the block and put back after it (0 or None:
    leave torch's setting)."""
    if not _check(threads):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
