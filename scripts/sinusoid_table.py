"""Reproduce the sinusoid table (Meta-SGD paper, Table 1): K = 5/10/20 shots, 1 inner step.

Trains MAML, Meta-SGD and the pretrained-on-all-tasks baseline for each K through the package, evaluates
each on the same test tasks, prints a markdown table next to the paper's figures and writes results.json.
    python scripts/sinusoid_table.py --iterations 20000 --out runs/sinusoid-table
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from gradient_meta.sinusoid import SinusoidConfig, evaluate, learned_step_size, save, train
from icl_metarl.harness.files import atomic_write_json

# Li et al. 2017, "Meta-SGD", Table 1 (1-step adaptation, 95% CI), as the paper prints them.
PAPER = {"maml": {5: (1.13, 0.18), 10: (0.77, 0.11), 20: (0.48, 0.08)},
         "meta-sgd": {5: (0.90, 0.16), 10: (0.53, 0.09), 20: (0.31, 0.05)}}
ALGOS = ("pretrain", "maml", "meta-sgd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20000, help="meta-updates per run (paper: 70,000)")
    ap.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS))
    ap.add_argument("--eval-tasks", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/sinusoid-table")
    ap.add_argument("--report", nargs="+", metavar="RESULTS_JSON",
                    help="train nothing: print the table from results.json files of earlier runs")
    args = ap.parse_args()

    rows = []
    if args.report:
        rows = [r for path in args.report for r in json.loads(Path(path).read_text())]
        args.shots = sorted({r["shots"] for r in rows})
        args.algos = [a for a in ALGOS if any(r["algo"] == a for r in rows)]
        args.iterations = sorted({r["config"]["iterations"] for r in rows})
        args.eval_tasks = rows[0]["tasks"]
    for shots in ([] if args.report else args.shots):
        for algo in args.algos:
            cfg = SinusoidConfig(algo=algo, shots=shots, iterations=args.iterations, seed=args.seed, log_every=5000)
            model, learner, seconds = train(cfg, log=lambda m: print(f"  [{algo} K={shots}] {m}", flush=True))
            save(Path(args.out) / f"{algo}-k{shots}", cfg, learner, seconds)
            res = evaluate(model, learner.params, learned_step_size(cfg, learner), shots, 1, args.eval_tasks)
            rows.append({"algo": algo, **res, "train_seconds": round(seconds, 1), "config": asdict(cfg)})
            print(f"{algo:9s} K={shots:2d}: MSE {res['mse']:.3f} ± {res['ci95']:.3f}  ({seconds:.0f}s)", flush=True)
            atomic_write_json(Path(args.out) / "results.json", rows)

    print("\n| method | " + " | ".join(f"{k}-shot (ours)" for k in args.shots) + " | "
          + " | ".join(f"{k}-shot (paper)" for k in args.shots) + " |")
    print("|---" * (1 + 2 * len(args.shots)) + "|")
    for algo in args.algos:
        ours = {r["shots"]: r for r in rows if r["algo"] == algo}
        paper = PAPER.get(algo, {})
        cells = [f"{ours[k]['mse']:.2f} ± {ours[k]['ci95']:.2f}" for k in args.shots]
        cells += [f"{paper[k][0]:.2f} ± {paper[k][1]:.2f}" if k in paper else "-" for k in args.shots]
        print(f"| {algo} | " + " | ".join(cells) + " |")
    total = sum(r["train_seconds"] for r in rows)
    print(f"\ntotal training wall-clock {total:.0f}s; {args.iterations} iterations per run, meta-batch 25, "
          f"{args.eval_tasks} test tasks x 100 query points")


if __name__ == "__main__":
    main()
