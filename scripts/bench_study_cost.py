"""What a study configuration costs at full size, measured from its first steps on this machine.

    python scripts/bench.py study_cost configs/ml45-icl.json --trials 2 --train-steps 3 --batch 1

Generates ``--trials`` trials with the configuration's own history settings (one worker, a temporary
directory, after a one-trial warm-up that builds the task lists), times ``--train-steps`` full AdamW steps of its in-context model at its window size with
``--batch`` windows, and prints env steps/s, tokens/s and the projected CPU hours of its generation,
pretraining and evaluation (the evaluator's env steps at the generation rate, a lower bound: the agent's
forward passes come on top). Rates from the first steps of a run, on whatever machine this is: state it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch
from bench_train import random_batch, tokens_per_second  # scripts/ is on the path when run as a script

from icl_metarl.harness.suites import get_suite
from icl_metarl.incontext.histories import generate
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig
from icl_metarl.study.config import load_config, stage_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--trials", type=int, default=2, help="trials to generate for the env-step rate")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="windows per timed optimizer step")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    gen = stage_config(cfg, "generate")
    suite = get_suite(cfg.suite)

    # 1. env steps/s of history generation (the expert, one worker), from the configuration's own settings
    # A first one-trial run builds the task lists (ML45's take ~25 s) so the timed one is stepping and writing.
    small = dataclasses.replace(gen, trials=a.trials, trials_per_shard=a.trials, workers=1)
    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as tmp:
        generate(dataclasses.replace(small, trials=1, trials_per_shard=1), warm, progress=False)
        t0 = time.perf_counter()
        generate(small, tmp, progress=False)
        seconds = time.perf_counter() - t0
    steps = a.trials * gen.episodes_per_trial * gen.episode_length
    env_rate = steps / seconds

    # 2. tokens/s of pretraining: the configuration's model at its window, full AdamW steps
    pre = cfg.pretrain
    c = ICLPolicyConfig(d_model=pre.d_model, n_layer=pre.n_layer, n_head=pre.n_head,
                        max_episode_length=cfg.episode_length, max_context_episodes=pre.episodes_per_window)
    T = c.max_positions
    model = ICLPolicy(c)
    token_rate = tokens_per_second(model, random_batch(c, a.batch, c.max_positions), a.train_steps)
    params = sum(x.numel() for x in model.parameters())

    # 3. the full-size totals
    gen_steps = gen.trials * gen.episodes_per_trial * gen.episode_length
    tokens = pre.steps * pre.batch_size * pre.grad_accum * T
    ev = stage_config(cfg, "evaluate")
    eval_steps = (len(ev.tasks()) * len(ev.seeds) * (ev.adaptation_episodes + ev.evaluation_episodes)
                  * ev.episode_length)
    print(f"{a.config}: suite {suite.name}, episodes of {cfg.episode_length} steps; torch threads {a.threads}")
    print(f"  generation: {steps} env steps in {seconds:.1f} s = {env_rate:,.0f} env steps/s on one core "
          f"(expert, {gen.noise_kind} noise)")
    print(f"  pretraining: d={pre.d_model}, {pre.n_layer} layers ({params / 1e6:.2f}M params), window {T} tokens, "
          f"batch {a.batch}: {token_rate:,.0f} tokens/s")
    print(f"  full size: histories {gen_steps / 1e6:.1f}M env steps = {gen_steps / env_rate / 3600:.1f} core-hours; "
          f"pretraining {tokens / 1e9:.2f}B tokens = {tokens / token_rate / 3600:,.0f} hours at this rate; "
          f"evaluation {eval_steps / 1e6:.2f}M env steps per agent = at least "
          f"{eval_steps / env_rate / 3600:.1f} core-hours per agent")


if __name__ == "__main__":
    main()
