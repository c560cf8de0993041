"""Rollout speed of the in-context agent: env steps/s of (a) a random policy, (b) the KV-cached agent,
(c) the same agent recomputing the whole context every step, on parallel ML1 trials (sync vector env).
(b) runs once per ``--agent-threads`` value: 1 thread is the agent's default (safe on a busy machine),
2 threads use the second core while the environments wait (an idle machine only).

    python scripts/bench_rollout.py --trials 10 20 --episodes 4 --episode-length 100
    python scripts/bench_rollout.py --backbones      # per-step cached forward: ours vs HF Llama / GPT-2
    python scripts/bench_rollout.py --split-timers   # ms in act vs in env.step, decode_step vs forward
    python scripts/bench_rollout.py --device cuda    # adds (d): the cached agent with its model on the GPU
    python scripts/bench_rollout.py --layouts sync pipelined --skip-recompute
                                                     # (a) and (b) through the evaluator's loop, in one
                                                     # process and with two env worker processes

``--layouts`` times (a) and (b) through ``rollout.play_lockstep`` (what ``icl-metarl evaluate`` runs),
with the environments built beforehand (a pipelined worker's start-up, ~2 s, is not counted): ``sync``
steps every trial in this process; ``pipelined`` steps each half of the trials in a worker process while
the agent computes the other half's actions (``--vector pipelined``).

The model is the default ``ICLPolicyConfig`` (untrained: speed does not depend on the weights). Each
figure is the best of ``--repeats`` runs, since the machine is shared; ratios are within this run.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from icl_metarl.harness.baselines import RandomAgent
from icl_metarl.harness.rollout import make_group_envs, play_lockstep, trial_groups
from icl_metarl.harness.suites import get_suite, make_trial_envs
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig


def play_timed(agent, envs, num_trials: int, episodes: int, episode_length: int, step_envs: bool = True) -> dict:
    """Play whole trials and time them: ``steps_per_s`` over act + step + observe + end_episode (resets
    excluded), and the ms per step spent in ``act`` and in ``env.step`` apart. Without ``step_envs`` the
    agent sees the reset observation again and again (its cost alone, no environment between its steps)."""
    agent.start_trials(num_trials, seed=0)
    t_act = t_env = elapsed = 0.0
    zeros = np.zeros(num_trials, dtype=np.float32)
    for _ in range(episodes):
        obs, _ = envs.reset()
        start = time.perf_counter()
        for _ in range(episode_length):
            t0 = time.perf_counter()
            action = agent.act(obs)
            t1 = time.perf_counter()
            if step_envs:
                obs, reward, _, _, info = envs.step(action)
                success = info["success"]
            else:
                reward = success = zeros
            t_env += time.perf_counter() - t1
            t_act += t1 - t0
            agent.observe(reward, success)
        agent.end_episode()
        elapsed += time.perf_counter() - start
    n = episodes * episode_length
    return {"steps_per_s": num_trials * n / elapsed, "act_ms": t_act / n * 1e3, "env_ms": t_env / n * 1e3}


def layout_steps_per_s(layout: str, agents: dict, tasks, episodes: int, episode_length: int, repeats: int) -> dict:
    """Best env steps/s of each agent over ``repeats`` whole trials played by the evaluator's loop in
    one layout (sync: one group in this process; pipelined: two worker groups)."""
    layout_groups = trial_groups(RandomAgent(), tasks, layout)
    envs = [make_group_envs(group_tasks, episode_length, offset, layout) for _, group_tasks, offset in layout_groups]
    best = {k: 0.0 for k in agents}
    try:
        for env in envs:
            env.wait_started()
        for _ in range(repeats):
            for name, agent in agents.items():  # interleaved, so drifting load hits all alike
                groups = trial_groups(agent, tasks, layout)
                start = time.perf_counter()
                for _ in play_lockstep(groups, envs, 0, episodes, 0, episode_length):
                    pass
                best[name] = max(best[name], len(tasks) * episodes * episode_length / (time.perf_counter() - start))
    finally:
        for env in envs:
            env.close()
    return best


class _ForwardStep:
    """The model seen through ``forward`` only: its ``decode_step`` is one cached token of the general
    forward (the agent's step before ``decode_step`` existed), to time the two paths side by side."""

    def __init__(self, model: ICLPolicy):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def decode_step(self, obs, prev_action, prev_reward, episode_start, step, cache, plan=None):
        b = obs.shape[0]
        out = self._model(obs[:, None], prev_action[:, None], prev_reward[:, None],
                          torch.full((b, 1), bool(episode_start)), torch.full((b, 1), int(step)),
                          past_key_values=cache, use_cache=True)
        return out.mean[:, -1], None if out.log_std is None else out.log_std[:, -1]


def backbone_ms_per_step(batch: int = 20, steps: int = 300) -> dict[str, float]:
    """Per-step cached forward latency (ms) at the default size: this model vs transformers backbones
    fed ``inputs_embeds`` (the reason model.py writes its own blocks), and the agent's one-token fast path."""
    from transformers import DynamicCache, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    c = ICLPolicyConfig()
    d, n_pos = c.d_model, c.max_positions
    hf = {
        "transformers LlamaModel": LlamaModel(LlamaConfig(
            hidden_size=d, intermediate_size=4 * d, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
            num_key_value_heads=c.n_head, vocab_size=1, max_position_embeddings=n_pos, bos_token_id=None,
            eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")),
        "transformers GPT2Model": GPT2Model(GPT2Config(
            n_embd=d, n_layer=c.n_layer, n_head=c.n_head, vocab_size=1, n_positions=n_pos, bos_token_id=None,
            eos_token_id=None, attn_implementation="sdpa")),
    }
    out = {}
    x = torch.randn(batch, 1, d)
    with torch.inference_mode():
        for name, model in hf.items():
            model.eval()
            cache = DynamicCache()
            t0 = time.perf_counter()
            for _ in range(steps):
                cache = model(inputs_embeds=x, past_key_values=cache, use_cache=True).past_key_values
            out[name] = (time.perf_counter() - t0) / steps * 1e3
        ours = ICLPolicy(c).eval()
        cache = ours.new_cache(batch)
        o, a, r = torch.randn(batch, 1, c.obs_dim), torch.zeros(batch, 1, c.act_dim), torch.zeros(batch, 1)
        start, step = torch.zeros(batch, 1, dtype=torch.bool), torch.zeros(batch, 1, dtype=torch.long)
        t0 = time.perf_counter()
        for _ in range(steps):
            ours(o, a, r, start, step, past_key_values=cache, use_cache=True)
        out["ICLPolicy (static cache, sdpa)"] = (time.perf_counter() - t0) / steps * 1e3
        o, a, r = o[:, 0], a[:, 0], r[:, 0]
        for name, plan in (("ICLPolicy.decode_step, no plan", None), ("ICLPolicy.decode_step + plan (the agent's)", ours.decode_plan())):
            cache = ours.new_cache(batch)
            t0 = time.perf_counter()
            for i in range(steps):
                ours.decode_step(o, a, r, False, i % c.max_episode_length, cache, plan)
            out[name] = (time.perf_counter() - t0) / steps * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--trials", type=int, nargs="+", default=[10, 20], help="parallel trials (one task each)")
    p.add_argument("--episodes", type=int, default=4, help="episodes per trial")
    p.add_argument("--episode-length", type=int, default=100, help="steps per episode (short, to keep it quick)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting; the best is reported")
    p.add_argument("--agent-threads", type=int, nargs="+", default=[1, 2],
                   help="torch threads of the cached agent's steps, one column (b) each (default 1 2)")
    p.add_argument("--device", default="cpu",
                   help="also time the cached agent with its model on this device (e.g. cuda), column (d)")
    p.add_argument("--skip-recompute", action="store_true", help="leave out (c), the slowest")
    p.add_argument("--layouts", nargs="+", choices=["sync", "pipelined"], default=None,
                   help="time (a) and (b) at the first --agent-threads through the evaluator's loop in these "
                        "layouts instead (ratios against (a) of the first layout and of the same layout)")
    p.add_argument("--backbones", action="store_true", help="only time one cached step of each backbone")
    p.add_argument("--split-timers", action="store_true",
                   help="only time act and env.step apart, for the cached agent through decode_step and through forward")
    args = p.parse_args()
    if args.backbones:
        torch.set_num_threads(1)  # as the agent runs its steps (InContextAgent.cpu_threads)
        times = backbone_ms_per_step()
        ours = times["ICLPolicy (static cache, sdpa)"]
        print(f"one cached step, batch 20, default size, torch threads {torch.get_num_threads()}:")
        for name, ms in times.items():
            print(f"  {name:44s} {ms:6.2f} ms/step  ({ms / ours:.1f}x ours)")
        return

    config = ICLPolicyConfig()  # the default model, max_context_episodes=4 >= --episodes: no re-encoding
    torch.manual_seed(0)
    model = ICLPolicy(config)
    n_params = sum(q.numel() for q in model.parameters())
    layout = ", ".join(args.layouts) if args.layouts else "sync vector env"
    print(f"{args.suite}, {args.episodes} episodes x {args.episode_length} steps per trial, {layout}")
    print(f"model: default ICLPolicyConfig (d={config.d_model}, {config.n_layer} layers, {config.n_head} heads, "
          f"{n_params / 1e6:.2f}M parameters, {model.attn_implementation}); torch threads {torch.get_num_threads()}")
    tasks = get_suite(args.suite).tasks("test", 0)
    if args.layouts:
        for n in args.trials:
            agents = {"(a) random": RandomAgent(), "(b) cached": InContextAgent(model, cpu_threads=args.agent_threads[0])}
            if not args.skip_recompute:
                agents["(c) recompute"] = InContextAgent(model, use_cache=False, cpu_threads=args.agent_threads[0])
            figures = {layout: layout_steps_per_s(layout, agents, tasks[:n], args.episodes, args.episode_length,
                                                  args.repeats) for layout in args.layouts}
            base_layout = args.layouts[0]
            base = figures[base_layout]["(a) random"]
            for layout, best in figures.items():
                print(f"{n:3d} trials, {layout:9s}: " + "  ".join(f"{k} {v:6.0f}" for k, v in best.items())
                      + " steps/s", flush=True)
                line = (f"      (b) / (a) same layout {best['(b) cached'] / best['(a) random']:.2f}x, "
                        f"(b) / (a) {base_layout} {best['(b) cached'] / base:.2f}x")
                if "(c) recompute" in best:
                    line += f", (b) / (c) {best['(b) cached'] / best['(c) recompute']:.1f}x"
                print(line, flush=True)
        return
    if args.split_timers:
        for n in args.trials:
            envs = make_trial_envs(tasks[:n], episode_length=args.episode_length, seed=0)
            agents = {"random": RandomAgent(), "cached, decode_step": InContextAgent(model),
                      "cached, forward": InContextAgent(model)}
            agents["cached, forward"].model = _ForwardStep(model)
            for step_envs in (True, False):
                best = {k: (float("inf"), float("inf")) for k in agents}
                for _ in range(args.repeats):
                    for name, agent in agents.items():
                        t = play_timed(agent, envs, n, args.episodes, args.episode_length, step_envs)
                        best[name] = min(best[name], (t["act_ms"], t["env_ms"]))
                where = "interleaved with env.step" if step_envs else "alone (no env.step between acts)"
                print(f"{n:3d} trials, {where}:")
                for name, (act, env) in best.items():
                    print(f"    {name:20s} act {act:6.3f} ms" + (f"   env.step {env:6.3f} ms" if step_envs else ""))
            envs.close()
        return
    for n in args.trials:
        envs = make_trial_envs(tasks[:n], episode_length=args.episode_length, seed=0)
        cached = {f"(b) cached, {k} thr": InContextAgent(model, cpu_threads=k) for k in args.agent_threads}
        agents = {"(a) random": RandomAgent(), **cached}
        if args.device != "cpu":  # a copy: the agent moves its model to its device
            agents[f"(d) cached on {args.device}"] = InContextAgent(copy.deepcopy(model), device=args.device)
        if not args.skip_recompute:  # at the first thread count
            agents["(c) recompute"] = InContextAgent(model, use_cache=False, cpu_threads=args.agent_threads[0])
        best = {k: 0.0 for k in agents}
        for _ in range(args.repeats):
            for name, agent in agents.items():  # interleaved, so drifting load hits all alike
                best[name] = max(best[name], play_timed(agent, envs, n, args.episodes, args.episode_length)["steps_per_s"])
        envs.close()
        print(f"{n:3d} trials: " + "  ".join(f"{name} {v:6.0f}" for name, v in best.items()) + " steps/s", flush=True)
        ratios = [f"{name[4:]} / random {best[name] / best['(a) random']:.2f}x" for name in cached]
        if args.device != "cpu":
            ratios.append(f"on {args.device} / random {best[f'(d) cached on {args.device}'] / best['(a) random']:.2f}x")
        if "(c) recompute" in best:
            first = next(iter(cached))
            ratios.append(f"b/c ({first[4:]}) {best[first] / best['(c) recompute']:.1f}x")
        print("      " + "  ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
