"""Two learners, each with replicate runs (training seeds), compared in one evaluation: success of A minus
success of B in one episode, averaged over the replicates task by task, with a 95% bootstrap interval over
tasks (seeds within tasks), tasks won/lost and the exact sign test.

Both groups must be in the same results.json (the same tasks and seeds: the evaluator's guarantee).

    python scripts/compare_pooled.py results/g22-test --a icl "icl #2" "icl #3" \\
        --b maml-imitate-maml-imitate-s0 maml-imitate-maml-imitate-s1 maml-imitate-maml-imitate-s2 --episode 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from icl_metarl.harness.evaluation import load_results
from icl_metarl.harness.report import bootstrap_ci, episode_array, won_lost


def pooled(results: dict, labels: list[str], episode: int) -> np.ndarray:
    """(tasks, seeds): success in ``episode`` (1-based) averaged over the replicate agents ``labels``."""
    s = results["settings"]
    n = s["adaptation_episodes"] + s["evaluation_episodes"]
    missing = [a for a in labels if a not in results["agents"]]
    if missing:
        sys.exit(f"compare_pooled: no agent {missing[0]!r} in the results; valid: {', '.join(results['agents'])}")
    if not 1 <= episode <= n:
        sys.exit(f"compare_pooled: --episode {episode} is outside 1..{n}")
    arrays = [episode_array(results["records"], a, "success", len(results["tasks"]), results["seeds"], n)[episode - 1]
              for a in labels]
    return np.mean(arrays, axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results directory (or results.json)")
    p.add_argument("--a", nargs="+", required=True, help="agent labels of learner A's replicates")
    p.add_argument("--b", nargs="+", required=True, help="agent labels of learner B's replicates")
    p.add_argument("--episode", type=int, required=True, help="episode (1-based) to compare")
    args = p.parse_args(argv)
    path = Path(args.results)
    results = load_results(path / "results.json" if path.is_dir() else path)
    a, b = pooled(results, args.a, args.episode), pooled(results, args.b, args.episode)
    fmt = lambda c, sign="+": f"{c[0]:{sign}.2f} [{c[1]:{sign}.2f}, {c[2]:{sign}.2f}]"  # noqa: E731
    won, lost, tasks, p_sign = won_lost(a - b)
    print(f"episode {args.episode}, {len(results['tasks'])} {results['settings']['split']} tasks x seeds "
          f"{results['seeds']}; A = mean of {len(args.a)} runs, B = mean of {len(args.b)} runs")
    print(f"A {fmt(bootstrap_ci(a), '')}  B {fmt(bootstrap_ci(b), '')}")
    print(f"A - B {fmt(bootstrap_ci(a - b))}; tasks won {won}, lost {lost} of {tasks}; sign test p {p_sign:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
