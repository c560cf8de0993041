"""scripts/pool_runs.py: replicate runs pooled task by task, checked against hand-computed means."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pool_runs.py"


def _write(path: Path, icl: np.ndarray, wiped: np.ndarray) -> None:
    """A results.json with an in-context agent and its wiped variant, success arrays (episodes, tasks, seeds)."""
    e, t, s = icl.shape
    records = [{"agent": a, "seed": seed, "task": j, "episode": k, "success": bool(x[k, j, seed])}
               for a, x in (("icl", icl), ("icl-wiped", wiped)) for k in range(e) for j in range(t) for seed in range(s)]
    path.mkdir()
    (path / "results.json").write_text(json.dumps({
        "settings": {"adaptation_episodes": e - 1, "evaluation_episodes": 1}, "tasks": [{"i": j} for j in range(t)],
        "seeds": list(range(s)), "records": records,
        "agents": {"icl": {"spec": "run", "adaptive": True}, "icl-wiped": {"spec": "run", "adaptive": False}}}))


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_pooled_difference_is_the_mean_over_runs_and_tasks(tmp_path):
    rng = np.random.default_rng(0)
    runs = [((rng.random((4, 40, 2)) < 0.7), (rng.random((4, 40, 2)) < 0.4)) for _ in range(2)]
    for i, (icl, wiped) in enumerate(runs):
        _write(tmp_path / f"r{i}", icl, wiped)
    out = _run(f"{tmp_path / 'r0'}:icl", f"{tmp_path / 'r1'}:icl", "--bootstrap", "200")
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("3 (last adaptation)"))
    diff = np.mean([icl[2].mean() - wiped[2].mean() for icl, wiped in runs])
    per_task = np.mean([(icl[2].astype(float) - wiped[2]).mean(1) for icl, wiped in runs], axis=0)
    assert f"{diff:+.2f} [" in line
    assert f"| {(per_task > 0).sum()} / {(per_task < 0).sum()}," in line


def test_bad_arguments_are_one_line_errors(tmp_path):
    icl = np.ones((2, 3, 1), dtype=bool)
    _write(tmp_path / "a", icl, icl)
    for arg, fragment in ((f"{tmp_path / 'a'}:nope", "no agent 'nope'"), (f"{tmp_path / 'a'}:icl-wiped", "not an adaptive"),
                          (str(tmp_path / "missing"), "is not RESULTS_DIR:AGENT")):
        out = _run(arg)
        assert out.returncode != 0 and fragment in out.stderr and len(out.stderr.strip().splitlines()) == 1
    _write(tmp_path / "b", np.ones((2, 4, 1), dtype=bool), np.ones((2, 4, 1), dtype=bool))
    out = _run(f"{tmp_path / 'a'}:icl", f"{tmp_path / 'b'}:icl")
    assert out.returncode != 0 and "different tasks or seeds" in out.stderr
