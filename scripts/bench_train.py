"""Training tokens per second of the in-context policy against a plain transformers GPT-2 backbone.

    python scripts/bench_train.py --context-episodes 4 --episode-length 500 --batch 2 --steps 5
    python scripts/bench_train.py --d-model 96 --n-layer 4 --context-stride 10 --context-episodes 4 \
        --episode-length 167 --batch 8 --threads 1 --acting-trials 20       # the ML10 CPU recipe's model

Both models have the same width, depth, heads and token embedding, see the same batch at a context of
episodes x length tokens (default 2,000), and take full AdamW steps; only the backbone differs. With
``--context-stride`` ours reads the batch under the compact cross-episode mask, GPT-2 (which has no
such mask) under its plain causal one: the same windows, the work each backbone does on them.
``--acting-trials N`` also times acting: N parallel trials stepped one token at a time for the
window's episodes (ours: ``InContextAgent``, its KV cache compacted at each episode end; GPT-2: its
``DynamicCache``, one token per forward), random observations, steps/s = trial-steps per second.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2Model

from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig
from icl_metarl.incontext.tokens import shift_previous


class GPT2Policy(nn.Module):
    """The same token embedding and head around transformers' GPT2Model (fed inputs_embeds)."""

    def __init__(self, c: ICLPolicyConfig):
        super().__init__()
        self.token_in = nn.Linear(c.obs_dim + c.act_dim + 2, c.d_model)
        self.step_emb = nn.Embedding(c.max_episode_length, c.d_model)
        self.backbone = GPT2Model(GPT2Config(n_embd=c.d_model, n_layer=c.n_layer, n_head=c.n_head,
                                             n_positions=c.max_context_episodes * c.max_episode_length,
                                             vocab_size=1, bos_token_id=None,
                                             eos_token_id=None,
                                             attn_implementation="sdpa"))
        self.head = nn.Linear(c.d_model, c.act_dim)
        self.reward_scale = c.reward_scale

    def loss(self, batch: dict) -> torch.Tensor:
        prev_a, prev_r = shift_previous(batch["actions"], batch["rewards"], batch["episode_start"])
        tokens = torch.cat([batch["obs"], prev_a, (prev_r * self.reward_scale)[..., None],
                            batch["episode_start"].float()[..., None]], -1)
        x = self.token_in(tokens) + self.step_emb(batch["step_in_episode"])
        mean = self.head(self.backbone(inputs_embeds=x).last_hidden_state)
        return ((torch.tanh(mean) - batch["expert_actions"]) ** 2).mean()


def random_batch(c: ICLPolicyConfig, batch: int, T: int) -> dict:
    """``batch`` windows of ``T`` random tokens, episodes aligned."""
    step = torch.arange(T) % c.max_episode_length
    return {"obs": torch.randn(batch, T, 39), "actions": torch.rand(batch, T, 4) * 2 - 1,
            "expert_actions": torch.rand(batch, T, 4) * 2 - 1, "rewards": torch.rand(batch, T) * 10,
            "episode_start": (step == 0).repeat(batch, 1), "step_in_episode": step.repeat(batch, 1)}


def tokens_per_second(model, batch: dict, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up the allocator and kernels
            times.append(time.perf_counter() - t0)
    b, t = batch["obs"].shape[:2]
    return b * t / min(times)


def acting_steps_per_second(c: ICLPolicyConfig, trials: int, episodes: int) -> float:
    """Trial-steps/s of the cached in-context agent over ``episodes`` episodes of ``trials`` trials."""
    from icl_metarl.incontext.agent import InContextAgent

    agent = InContextAgent(ICLPolicy(c).eval(), cpu_threads=None)
    agent.start_trials(trials, 0)
    obs, reward, success = np.zeros((trials, c.obs_dim), np.float32), np.zeros(trials), np.zeros(trials)
    t0 = time.perf_counter()
    for _ in range(episodes):
        for _ in range(c.max_episode_length):
            agent.act(obs)
            agent.observe(reward, success)
        agent.end_episode()
    return trials * episodes * c.max_episode_length / (time.perf_counter() - t0)


@torch.inference_mode()
def gpt2_acting_steps_per_second(model: "GPT2Policy", c: ICLPolicyConfig, trials: int, episodes: int) -> float:
    """The same for the GPT-2 backbone: one token per forward with transformers' DynamicCache."""
    from transformers import DynamicCache

    model.eval()
    cache = DynamicCache()
    x = torch.zeros(trials, 1, c.obs_dim + c.act_dim + 2)
    t0 = time.perf_counter()
    for _ in range(episodes):
        for t in range(c.max_episode_length):
            h = model.token_in(x) + model.step_emb(torch.full((trials, 1), t))
            out = model.backbone(inputs_embeds=h, cache=cache, use_cache=True)  # the cache grows in place
            torch.tanh(model.head(out.last_hidden_state))
    return trials * episodes * c.max_episode_length / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context-episodes", type=int, default=4)
    p.add_argument("--episode-length", type=int, default=500)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--context-stride", type=int, default=0, help="0: full context; s: the compact one")
    p.add_argument("--acting-trials", type=int, default=0, help="also time acting with N trials (0: no)")
    p.add_argument("--keep-best-too", action="store_true",
                   help="compact context: also time the same model keeping each episode's best step (per-row mask)")
    p.add_argument("--best-steps", type=int, default=1,
                   help="with --keep-best-too: how many best steps each episode keeps (context_best_steps)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = ICLPolicyConfig(max_episode_length=args.episode_length, max_context_episodes=args.context_episodes,
                        d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                        context_stride=args.context_stride)
    B, T = args.batch, args.context_episodes * args.episode_length
    batch = random_batch(c, B, T)
    ours = ICLPolicy(c)
    gpt2 = GPT2Policy(c)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Interleave the two measurements so that load on the shared machine hits both alike.
    a, b = [], []
    for _ in range(2):
        a.append(tokens_per_second(ours, batch, args.steps))
        b.append(tokens_per_second(gpt2, batch, args.steps))
    form = f"compact context, stride {c.context_stride}" if c.compact else "full context"
    print(f"window {T} tokens ({args.context_episodes} x {args.episode_length}, {form}), batch {B}, "
          f"threads {torch.get_num_threads()}, device cpu")
    print(f"  ICLPolicy (ours, {n(ours) / 1e6:.2f}M params): {max(a):8.0f} tokens/s, {max(a) / T:6.1f} windows/s")
    print(f"  GPT-2 backbone ({n(gpt2) / 1e6:.2f}M params):  {max(b):8.0f} tokens/s, {max(b) / T:6.1f} windows/s")
    print(f"  ratio ours / GPT-2: {max(a) / max(b):.2f}x   (GPT-2 attention: {gpt2.backbone.config._attn_implementation})")
    if args.keep_best_too and c.compact:
        kb = ICLPolicy(ICLPolicyConfig(**{**c.to_dict(), "context_keep_best": True,
                                          "context_best_steps": args.best_steps}))
        kb.load_state_dict(ours.state_dict())
        plain, best = [], []
        for _ in range(2):  # interleaved, as above
            plain.append(tokens_per_second(ours, batch, args.steps))
            best.append(tokens_per_second(kb, batch, args.steps))
        print(f"  keeping each episode's {args.best_steps} best step(s) too: {max(best):8.0f} tokens/s against {max(plain):8.0f} "
              f"without, ratio {max(best) / max(plain):.2f}x")
    if args.acting_trials:
        ours_act = acting_steps_per_second(c, args.acting_trials, args.context_episodes)
        gpt2_act = gpt2_acting_steps_per_second(gpt2, c, args.acting_trials, args.context_episodes)
        print(f"acting, {args.acting_trials} trials x {args.context_episodes} episodes, one token per step:")
        print(f"  ours (KV cache{', compacted per episode' if c.compact else ''}): {ours_act:8.0f} steps/s")
        print(f"  GPT-2 (DynamicCache):  {gpt2_act:8.0f} steps/s")
        print(f"  ratio ours / GPT-2: {ours_act / gpt2_act:.2f}x")


if __name__ == "__main__":
    main()
