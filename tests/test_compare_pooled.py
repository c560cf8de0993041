"""scripts/compare_pooled.py: two learners' replicates pooled task by task, against hand-computed means."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_pooled.py"


def test_pooled_difference_against_hand_computed_means(tmp_path):
    rng = np.random.default_rng(0)
    success = {f"a{i}": (rng.random((2, 6, 2)) < 0.7).astype(float) for i in range(2)}
    success["b0"] = (rng.random((2, 6, 2)) < 0.2).astype(float)
    records = [{"agent": a, "seed": s, "task": t, "episode": k, "success": bool(x[k, t, s]), "return": 0.0,
                "steps_to_success": None}
               for a, x in success.items() for k in range(2) for t in range(6) for s in range(2)]
    results = {"format": "icl_metarl.evaluation/1", "settings": {"adaptation_episodes": 1, "evaluation_episodes": 1,
               "split": "test"}, "tasks": [{}] * 6, "seeds": [0, 1], "records": records,
               "agents": {a: {"spec": a, "adaptive": True} for a in success}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--a", "a0", "a1", "--b", "b0", "--episode", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    want = ((success["a0"][1] + success["a1"][1]) / 2 - success["b0"][1]).mean()
    assert f"A - B {want:+.2f}" in out.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--a", "zz", "--b", "b0", "--episode", "2"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no agent 'zz'" in bad.stderr and "valid: a0, a1, b0" in bad.stderr
