"""Does in-context adaptation transfer to unseen tasks? Training-task diversity x relabelling rounds: the
sweep of docs/results.md ("What made it transfer"; docs/sweep-reach.png, docs/sweep-reach-goal.png), end to end.

    python scripts/reproduce_reach_transfer.py --out sweeps/reach --pools 10 50 200 fresh --rounds 0 1 \\
        --steps 600 --trials 200
    # the recipe that transfers on reach-v3 (docs/results.md): goal noise at a random level per episode,
    # exploring in the first episode
    python scripts/reproduce_reach_transfer.py --out sweeps/reach-goal --pools 10 50 200 fresh --rounds 0 1 3 \\
        --steps 600 --trials 300 --relabel-trials 200 --noise-kind goal --noise-schedule random \\
        --noise-max 0.15 --explore-episodes 1 --explore-scale 0.25

For every task pool it generates expert histories (annealed noise) on the suite's train environments;
for every (pool, rounds) pair it pretrains at the same number of optimizer steps, then measures the
held-out action error on test-task histories and the online success per episode on the test tasks,
with the context kept (adaptive) and wiped every episode (non-adaptive). Every piece resumes; the
table (sweep.md), the raw figures (sweep.json) and the plot (sweep.png) are rewritten after each pair.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents
from icl_metarl.harness.files import atomic_write_json, atomic_write_text
from icl_metarl.harness.report import episode_array
from icl_metarl.harness.statistics import mean_interval
from icl_metarl.incontext.histories import GenerateConfig, generate
from icl_metarl.incontext.train import TrainConfig, heldout_loss, pretrain


def success_curves(results: dict, num_tasks: int) -> dict:
    """Per agent label: success per episode index as (mean, lo, hi) over test tasks."""
    out = {}
    episodes = results["settings"]["adaptation_episodes"] + results["settings"]["evaluation_episodes"]
    for label in results["agents"]:
        arr = episode_array(results["records"], label, "success", num_tasks, results["seeds"], episodes)
        out[label] = [mean_interval(arr[k]) for k in range(episodes)]  # arr: (episodes, tasks, seeds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="ML1:reach-v3")
    p.add_argument("--out", required=True)
    p.add_argument("--pools", nargs="+", default=["10", "50", "200", "fresh"])
    p.add_argument("--rounds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--trials", type=int, default=200, help="expert trials per pool")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--episode-length", type=int, default=100)
    p.add_argument("--noise-kind", default="uniform")
    p.add_argument("--noise-schedule", default="linear", help="noise level per episode: linear (annealed) or random")
    p.add_argument("--noise-max", type=float, default=1.0, help="largest noise level")
    p.add_argument("--explore-episodes", type=int, default=0,
                   help="the policy explores in its first N episodes (relabelling rounds and evaluation)")
    p.add_argument("--explore-scale", type=float, default=0.0, help="scale of the exploration offset")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every run (equal budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--relabel-trials", type=int, default=0)
    p.add_argument("--eval-tasks", type=int, default=50)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--test-histories", help="histories of the test split for the held-out action error "
                                             "(default: generated into OUT/data/test)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(suite=args.suite, episodes_per_trial=args.episodes, episode_length=args.episode_length,
                  noise_kind=args.noise_kind, noise_schedule=args.noise_schedule, noise_max=args.noise_max,
                  trials_per_shard=20)
    test_hist = args.test_histories or str(out / "data" / "test")
    if not args.test_histories:
        generate(GenerateConfig(split="test", trials=50, seed=99, **common), test_hist)

    table_path = out / "sweep.json"
    rows = json.loads(table_path.read_text()) if table_path.exists() else {}
    for pool in args.pools:
        data = out / "data" / f"pool-{pool}"
        trials = max(args.trials, int(pool)) if pool.isdigit() else args.trials
        generate(GenerateConfig(task_pool=pool, trials=trials, seed=0, **common), data)
        for rounds in args.rounds:
            key = f"pool={pool} rounds={rounds}"
            if key in rows:
                continue
            run = out / "runs" / f"pool-{pool}-r{rounds}"
            cfg = TrainConfig(data=[str(data)], out=str(run), steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, d_model=args.d_model, n_layer=args.n_layer, threads=args.threads,
                              episodes_per_window=args.episodes, relabel_rounds=rounds,
                              relabel_trials=args.relabel_trials, explore_episodes=args.explore_episodes,
                              explore_scale=args.explore_scale, resume=True, checkpoint_every=200)
            if not (run / "model.safetensors").exists():
                pretrain(cfg)
            row = {
                "pool": pool, "rounds": rounds, "steps": args.steps,
                "train_loss": heldout_loss(run, [str(data)]),
                "test_loss": heldout_loss(run, [test_hist]),
            }
            ev = EvalConfig(suite=args.suite, adaptation_episodes=args.episodes - 1, evaluation_episodes=1,
                            episode_length=args.episode_length, seeds=tuple(args.seeds), num_tasks=args.eval_tasks,
                            progress=False)
            results = evaluate(load_agents([str(run)], non_adaptive=True), ev, out / "evals" / run.name)
            curves = success_curves(results, args.eval_tasks)
            row["success_context"], row["success_wiped"] = list(curves.values())
            rows[key] = row
            atomic_write_json(table_path, rows)
            write_table(rows, out)
            print(f"{key}: action MSE train {row['train_loss']:.4f} test {row['test_loss']:.4f}; success per "
                  f"episode with context {[round(c[0], 2) for c in row['success_context']]}, "
                  f"wiped {[round(c[0], 2) for c in row['success_wiped']]}", flush=True)


def write_table(rows: dict, out: Path) -> None:
    """sweep.md (one row per run) and sweep.png (action error and last-episode success per pool)."""
    def fmt(c):
        return f"{c[0]:.2f} [{c[1]:.2f}, {c[2]:.2f}]"

    lines = ["| pool | rounds | action MSE, train tasks | action MSE, test tasks | test success per episode, "
             "context kept | same, context wiped every episode | last episode: kept - wiped |",
             "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        kept, wiped = r["success_context"], r["success_wiped"]
        lines.append(f"| {r['pool']} | {r['rounds']} | {r['train_loss']:.4f} | {r['test_loss']:.4f} | "
                     f"{' / '.join(f'{c[0]:.2f}' for c in kept)} | {' / '.join(f'{c[0]:.2f}' for c in wiped)} | "
                     f"{kept[-1][0] - wiped[-1][0]:+.2f} (kept {fmt(kept[-1])}) |")
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fewest distinct tasks first; 'fresh' (a new task per trial) last.
    pools = sorted(dict.fromkeys(r["pool"] for r in rows.values()),
                   key=lambda p: (not p.isdigit(), int(p) if p.isdigit() else 0, p))
    x = np.arange(len(pools))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for rounds in sorted({r["rounds"] for r in rows.values()}):
        sel = {r["pool"]: r for r in rows.values() if r["rounds"] == rounds}
        xs = [i for i, p in enumerate(pools) if p in sel]
        a1.plot(xs, [sel[pools[i]]["test_loss"] for i in xs], "o-", label=f"test tasks, {rounds} rounds")
        a1.plot(xs, [sel[pools[i]]["train_loss"] for i in xs], "x--", label=f"train tasks, {rounds} rounds")
        for key, style in (("success_context", "o-"), ("success_wiped", "x--")):
            m = np.array([sel[pools[i]][key][-1] for i in xs])
            a2.errorbar(xs, m[:, 0], yerr=[m[:, 0] - m[:, 1], m[:, 2] - m[:, 0]], fmt=style, capsize=3,
                        label=f"{'context' if key == 'success_context' else 'wiped'}, {rounds} rounds")
    for a, title in ((a1, "held-out action MSE"), (a2, "test success, last episode (95% CI)")):
        a.set_xticks(x, pools)
        a.set_xlabel("training task pool")
        a.set_title(title)
        a.legend(fontsize=7)
    fig.tight_layout()
    tmp = out / ".sweep.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out / "sweep.png")


if __name__ == "__main__":
    main()
