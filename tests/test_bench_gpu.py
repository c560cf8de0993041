"""scripts/bench_gpu.py, the prepared device check: every path runs on the CPU at a tiny size, its FLOPs
count is the standard one, and bad input is one line."""

import json
from pathlib import Path

import torch
from _scripts import load_script

from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def _script():
    return load_script("bench_gpu")


def test_flops_per_token_counts_matrix_weights_and_causal_attention():
    bench = _script()
    c = ICLPolicyConfig(d_model=32, n_layer=2, n_head=2, max_episode_length=50, max_context_episodes=2)
    model = ICLPolicy(c)
    d, L, T = c.d_model, c.n_layer, c.max_positions
    # attention (q, k, v, out: 4 d^2) and a 4x MLP (8 d^2) per layer, the token embedding and the head
    n = 12 * L * d * d + (c.obs_dim + c.act_dim + 2) * d + d * c.act_dim
    assert bench.matrix_params(model) == n
    assert bench.flops_per_token(model) == 6 * n + 6 * L * T * d


def test_every_setting_runs_on_the_cpu_and_is_written(tmp_path, capsys):
    bench = _script()
    out = tmp_path / "figures.json"
    rc = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--batch", "1", "--kernels", "default", "math",
                     "--trials", "2", "--act-steps", "3", "--out", str(out)])
    assert rc == 0
    figures = json.loads(out.read_text())
    rows = {(r["precision"], r["kernel"]): r for r in figures["train"]}
    assert set(rows) == {("fp32", "default"), ("fp32", "math"), ("bf16", "default"), ("bf16", "math")}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert figures["acting"][0]["cpu"] > 0
    assert "bf16 / fp32 (default kernel)" in capsys.readouterr().out


def test_the_agreement_check_compares_the_same_inputs():
    bench = _script()
    torch.manual_seed(0)
    model = ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=1, n_head=2, max_episode_length=40, max_context_episodes=2))
    assert bench.acting_agreement(model, torch.device("cpu"), trials=2, steps=20) == 0.0


def test_bad_input_is_one_line(capsys):
    bench = _script()
    assert bench.main(["--tiny", "--kernels", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bench_gpu.py: error: --kernels 'fast' is not one of default, flash, efficient, math"
    assert bench.main(["--configs", str(SCRIPT)]) == 2
    assert "not a study configuration" in capsys.readouterr().err
