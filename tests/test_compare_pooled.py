"""scripts/compare_pooled.py: two learners' replicates pooled task by task, against hand-computed means."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_pooled.py"


def _results(success: dict, tasks: list, split: str = "test") -> dict:
    records = [{"agent": a, "seed": s, "task": t, "episode": k, "success": bool(x[k, t, s]), "return": 0.0,
                "steps_to_success": None}
               for a, x in success.items() for k in range(2) for t in range(len(tasks)) for s in range(2)]
    return {"format": "icl_metarl.evaluation/1", "settings": {"adaptation_episodes": 1, "evaluation_episodes": 1,
            "split": split}, "tasks": tasks, "seeds": [0, 1], "records": records,
            "agents": {a: {"spec": a, "adaptive": True} for a in success}}


def test_pooled_difference_against_hand_computed_means(tmp_path):
    rng = np.random.default_rng(0)
    success = {f"a{i}": (rng.random((2, 6, 2)) < 0.7).astype(float) for i in range(2)}
    success["b0"] = (rng.random((2, 6, 2)) < 0.2).astype(float)
    (tmp_path / "results.json").write_text(json.dumps(_results(success, [{}] * 6)))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--a", "a0", "a1", "--b", "b0", "--episode", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    want = ((success["a0"][1] + success["a1"][1]) / 2 - success["b0"][1]).mean()
    assert f"A - B {want:+.2f}" in out.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--a", "zz", "--b", "b0", "--episode", "2"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no agent 'zz'" in bad.stderr and "valid: a0, a1, b0" in bad.stderr


def test_agents_of_several_evaluations_pair_task_by_task(tmp_path):
    rng = np.random.default_rng(1)
    success = {name: (rng.random((2, 5, 2)) < p).astype(float) for name, p in (("a0", 0.7), ("a1", 0.6), ("b0", 0.3))}
    tasks = [{"index": i} for i in range(5)]
    one, left, right = tmp_path / "one", tmp_path / "left", tmp_path / "right"
    for d, agents in ((one, success), (left, {"a0": success["a0"], "b0": success["b0"]}), (right, {"a1": success["a1"]})):
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_results(agents, tasks)))

    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)

    together = run(one, "--a", "a0", "a1", "--b", "b0", "--episode", "2")
    apart = run(left, right, "--a", "a0", "a1", "--b", "b0", "--episode", "2")
    assert together.returncode == 0 and apart.returncode == 0, apart.stderr
    assert together.stdout == apart.stdout  # the same pooled figures whether the agents were played together or not

    # a label in two evaluations must be named by its directory; then it resolves
    ambiguous = run(one, left, "--a", "a0", "--b", "b0", "--episode", "2")
    assert ambiguous.returncode != 0 and "RESULTS_DIR:LABEL" in ambiguous.stderr
    named = run(one, left, "--a", f"{left}:a0", "--b", f"{one}:b0", "--episode", "2")
    assert named.returncode == 0, named.stderr
    assert named.stdout == run(one, "--a", "a0", "--b", "b0", "--episode", "2").stdout

    # other tasks or another split do not pair: refused in one line
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(_results({"c": success["b0"]}, tasks, split="validation")))
    bad = run(left, other, "--a", "a0", "--b", "c", "--episode", "2")
    assert bad.returncode != 0 and "split='validation'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    (other / "results.json").write_text(json.dumps(_results({"c": success["b0"]}, tasks[::-1])))
    bad = run(left, other, "--a", "a0", "--b", "c", "--episode", "2")
    assert bad.returncode != 0 and "different tasks" in bad.stderr
