"""The GPU figures nobody has measured yet, in one short run: pretraining tokens/s and model FLOPs
utilisation (MFU) of the full-size in-context policies, fp32 against bf16, per SDPA kernel, and the
in-context agent's acting speed on the GPU against the CPU.

    python scripts/bench_gpu.py                                  # configs/ml10-icl.json and ml45-icl.json
    python scripts/bench_gpu.py --tiny --device cpu              # a seconds-long smoke run of every path

What is measured, all in one process and interleaved where two figures form a ratio:
- **Training**: full AdamW steps (forward, backward, step) of ``ICLPolicy`` at each configuration's width,
  depth, heads and trained context (episodes_per_window x episode_length tokens) on random windows, for
  fp32 and bf16 autocast (what ``mixed_precision: auto`` picks on a GPU), and under each SDPA kernel that
  the device accepts (flash, memory-efficient, math; "default" lets PyTorch choose). The best of
  ``--steps`` timed steps after one warm-up step, so the figure is the kernel's, not the allocator's.
- **MFU**: tokens/s x FLOPs per token / the device's dense peak. FLOPs per training token:
  6 N (N: parameters in matrices, embeddings excluded) + 6 L T d (causal attention's two matmuls, half
  of the T x T square, times 3 for forward and backward). The peak is ``--peak-tflops`` or, for a known
  device name, its datasheet dense figure (bf16; fp32 runs are divided by the fp32 figure).
- **Agreement**: the cached agent's actions on the device against the CPU, fp32, same inputs (a
  correctness check of the device path, printed as the largest difference).
- **Acting**: the KV-cached agent's ``act`` + ``observe`` for ``--trials`` parallel trials (no
  environment: its cost alone), steps/s on the device against the CPU with one thread.

Nothing is downloaded; the weights are random (speed does not depend on them). Prints one line per
figure and, with ``--out``, writes them to a JSON file (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_json
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.loss import window_loss
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig

KERNELS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "math": SDPBackend.MATH}
# Dense peak TFLOP/s from the vendors' datasheets (SXM parts; no sparsity): (bf16, fp32 without TF32).
PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
         "A10": (125.0, 31.2), "L4": (121.0, 30.3)}


def model_config(path: str | None, tiny: bool) -> tuple[str, ICLPolicyConfig]:
    """(name, config) of a study file's pretraining model; ``tiny``: a small model for smoke runs."""
    if tiny:
        return "tiny", ICLPolicyConfig(d_model=32, n_layer=2, n_head=2, max_episode_length=50, max_context_episodes=2)
    try:
        study = json.loads(Path(path).read_text())
        p = study["pretrain"]
        return study.get("name", Path(path).stem), ICLPolicyConfig(
            d_model=p["d_model"], n_layer=p["n_layer"], n_head=p["n_head"],
            max_episode_length=study["episode_length"], max_context_episodes=p["episodes_per_window"])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: not a study configuration with pretrain.d_model/n_layer/n_head/"
                         f"episodes_per_window and episode_length ({e})") from None


def matrix_params(model: ICLPolicy) -> int:
    """Parameters that multiply activations (every Linear weight): the N of 6 N FLOPs per token."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(model: ICLPolicy) -> float:
    c = model.config
    return 6.0 * matrix_params(model) + 6.0 * c.n_layer * c.max_positions * c.d_model


def random_windows(c: ICLPolicyConfig, batch: int, device: torch.device) -> dict:
    """``batch`` windows of random tokens at the model's whole context, episodes aligned."""
    T = c.max_positions
    step = torch.arange(T, device=device) % c.max_episode_length
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.rand(*s, generator=g).to(device)  # noqa: E731
    return {"obs": rand(batch, T, c.obs_dim), "actions": rand(batch, T, c.act_dim) * 2 - 1,
            "expert_actions": rand(batch, T, c.act_dim) * 2 - 1, "rewards": rand(batch, T),
            "episode_start": (step == 0).repeat(batch, 1), "step_in_episode": step.repeat(batch, 1)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_tokens_per_s(model: ICLPolicy, batch: dict, steps: int, bf16: bool, kernel: str) -> float:
    """Best tokens/s over ``steps`` AdamW steps after one warm-up step; raises RuntimeError when the
    device has no such kernel for these inputs."""
    device = batch["obs"].device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    model.train()
    best = math.inf
    backend = KERNELS[kernel]
    for i in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        with (sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = window_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    b, t = batch["obs"].shape[:2]
    return b * t / best


def acting_steps_per_s(model: ICLPolicy, device: torch.device, trials: int, steps: int) -> float:
    """The cached agent alone: ``steps`` act + observe calls for ``trials`` parallel trials, steps/s."""
    agent = InContextAgent(model, device=device, cpu_threads=1)
    agent.start_trials(trials, seed=0)
    rng = np.random.default_rng(0)
    obs = rng.random((trials, model.config.obs_dim), dtype=np.float32)
    zeros = np.zeros(trials, dtype=np.float32)
    agent.act(obs)  # warm-up: first kernels, first cache writes
    agent.observe(zeros, zeros)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        agent.act(obs)
        agent.observe(zeros, zeros)
    sync(device)
    return trials * steps / (time.perf_counter() - t0)


def acting_agreement(model: ICLPolicy, device: torch.device, trials: int = 8, steps: int = 60) -> float:
    """Largest |action difference| between the cached agent on ``device`` and on the CPU, fed the same
    observations and rewards for ``steps`` steps over two episodes (fp32; TF32 off while it runs)."""
    rng = np.random.default_rng(1)
    obs = rng.random((steps, trials, model.config.obs_dim), dtype=np.float32)
    rewards = rng.random((steps, trials), dtype=np.float32)
    zeros = np.zeros(trials, dtype=np.float32)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        actions = []
        for dev in (device, torch.device("cpu")):
            agent = InContextAgent(model.to(dev), device=dev, cpu_threads=1)
            agent.start_trials(trials, seed=0)
            played = []
            for i in range(steps):
                played.append(agent.act(obs[i]))
                agent.observe(rewards[i], zeros)
                if i == steps // 2:
                    agent.end_episode()
            actions.append(np.stack(played))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.to(device)
    return float(np.abs(actions[0] - actions[1]).max())


def peak_tflops(device: torch.device, given: float | None) -> tuple[float, float] | None:
    if given:
        return given, given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/ml10-icl.json", "configs/ml45-icl.json"],
                   help="study files whose pretraining model to measure")
    p.add_argument("--tiny", action="store_true", help="one small model instead of --configs (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8, help="windows per training step")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per setting (after one warm-up)")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), help=f"SDPA kernels to try: {', '.join(KERNELS)}")
    p.add_argument("--trials", type=int, default=250, help="parallel trials of the acting benchmark")
    p.add_argument("--act-steps", type=int, default=200, help="act + observe calls of the acting benchmark")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for MFU (default: a datasheet figure for known GPUs)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
        bad = [k for k in args.kernels if k not in KERNELS]
        if bad:
            raise UsageError(f"--kernels {bad[0]!r} is not one of {', '.join(KERNELS)}")
        models = [model_config(None, True)] if args.tiny else [model_config(f, False) for f in args.configs]
    except UsageError as e:
        print(f"bench_gpu.py: error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)
    peaks = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (1 thread)"
    print(f"device: {name}; torch {torch.__version__}; dense peak TFLOP/s (bf16, fp32): {peaks or 'unknown'}")
    figures = {"device": name, "torch": torch.__version__, "peak_tflops": peaks, "train": [], "acting": []}
    for label, cfg in models:
        model = ICLPolicy(cfg).to(device)
        batch = random_windows(cfg, args.batch, device)
        fpt = flops_per_token(model)
        print(f"{label}: d={cfg.d_model}, {cfg.n_layer} layers, {cfg.n_head} heads, context {cfg.max_positions} "
              f"tokens, {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params, "
              f"{fpt / 1e6:.0f} MFLOPs per training token, batch {args.batch}")
        for bf16 in (False, True):
            for kernel in args.kernels:
                row = {"model": label, "precision": "bf16" if bf16 else "fp32", "kernel": kernel}
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    tps = train_tokens_per_s(model, batch, args.steps, bf16, kernel)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    row["error"] = str(e).splitlines()[0][:120]
                    print(f"  train {row['precision']:4s} {kernel:9s}: not run ({row['error']})")
                    figures["train"].append(row)
                    continue
                row["tokens_per_s"] = tps
                if peaks:
                    row["mfu"] = tps * fpt / (peaks[0 if bf16 else 1] * 1e12)
                if device.type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                figures["train"].append(row)
                extra = "".join([f", MFU {row['mfu']:.1%}" if "mfu" in row else "",
                                 f", {row['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in row else ""])
                print(f"  train {row['precision']:4s} {kernel:9s}: {tps:10.0f} tokens/s{extra}", flush=True)
        fp32 = {r["kernel"]: r.get("tokens_per_s") for r in figures["train"] if r["model"] == label and r["precision"] == "fp32"}
        bf = {r["kernel"]: r.get("tokens_per_s") for r in figures["train"] if r["model"] == label and r["precision"] == "bf16"}
        if fp32.get("default") and bf.get("default"):
            print(f"  bf16 / fp32 (default kernel): {bf['default'] / fp32['default']:.2f}x")
        del batch
        model.eval()
        if device.type != "cpu":
            diff = acting_agreement(model, device)
            figures.setdefault("agreement", []).append({"model": label, "max_abs_action_diff": diff})
            print(f"  cached agent on {device.type} against the CPU, fp32: largest action difference {diff:.2e}")
        on_device = acting_steps_per_s(model, device, args.trials, args.act_steps)
        row = {"model": label, "trials": args.trials, device.type: on_device}
        line = f"  acting, {args.trials} trials: {on_device:10.0f} steps/s on {device.type}"
        if device.type != "cpu":
            on_cpu = acting_steps_per_s(model.cpu(), torch.device("cpu"), args.trials, max(args.act_steps // 10, 5))
            row["cpu"] = on_cpu
            line += f", {on_cpu:.0f} on the CPU (1 thread): {on_device / on_cpu:.1f}x"
        figures["acting"].append(row)
        print(line, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        atomic_write_json(args.out, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
