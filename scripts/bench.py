"""Every benchmark behind one entry (their figures are in docs/benchmarks.md, with machine and command).

    python scripts/bench.py                      # list them, each with the first line of what it measures
    python scripts/bench.py NAME [ARGS ...]      # run scripts/bench_NAME.py with ARGS (NAME --help: its flags)

A benchmark is one file ``bench_NAME.py`` beside this one; adding a file adds a benchmark. Each runs as its
own program (as ``python scripts/bench_NAME.py ARGS`` would), so timings see a fresh process.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmarks() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def summary(path: Path) -> str:
    """The first line of a benchmark's docstring, read without importing it (imports are heavy)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.splitlines()[0] if doc else ""


def main(argv: list[str]) -> int:
    found = benchmarks()
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.strip().splitlines()[0] + "\n")
        for name, path in found.items():
            print(f"  {name:12s} {summary(path)}")
        return 0
    name, args = argv[0], argv[1:]
    if name not in found:
        print(f"bench.py: error: no benchmark {name!r}; valid: {', '.join(found)}", file=sys.stderr)
        return 2
    os.execv(sys.executable, [sys.executable, str(found[name]), *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
