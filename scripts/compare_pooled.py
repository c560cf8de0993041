"""Two learners, each with replicate runs (training seeds), compared in one evaluation: success of A minus
success of B in one episode, averaged over the replicates task by task, with a 95% bootstrap interval over
tasks (seeds within tasks), tasks won/lost and the exact sign test.

The agents come from one results.json or from several evaluations of the same protocol (suite, split,
episodes, episode length, tasks and seeds must be identical, so records pair task by task; anything else is
refused in one line). A label found in several of them is named ``RESULTS_DIR:LABEL``.

    python scripts/compare_pooled.py results/g22-test --a icl "icl #2" "icl #3" \\
        --b maml-imitate-maml-imitate-s0 maml-imitate-maml-imitate-s1 maml-imitate-maml-imitate-s2 --episode 3
    python scripts/compare_pooled.py results/icl-test results/grad-test --a icl "icl #2" --b maml-iteration-000320 \\
        "maml-iteration-000320 #2" --episode 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from icl_metarl.harness.evaluation import load_results
from icl_metarl.harness.report import bootstrap_ci, episode_array, won_lost

# what makes two evaluations' records pair task by task (batch size, vector mode, progress do not)
PROTOCOL = ("suite", "split", "adaptation_episodes", "evaluation_episodes", "episode_length", "seeds", "num_tasks",
            "tasks_per_env", "task_seed")


def load_all(paths: list[str]) -> list[tuple[str, dict]]:
    """(name, results) of each path; exits in one line unless they share one protocol, tasks and seeds."""
    loaded = []
    for where in paths:
        path = Path(where) / "results.json" if Path(where).is_dir() else Path(where)
        if not path.is_file():
            sys.exit(f"compare_pooled: no results.json at {where!r}")
        loaded.append((where.rstrip("/"), load_results(path)))
    (first, r0), rest = loaded[0], loaded[1:]
    for name, r in rest:
        for key in PROTOCOL:
            if r["settings"].get(key) != r0["settings"].get(key):
                sys.exit(f"compare_pooled: {name} was played with {key}={r['settings'].get(key)!r}, {first} with "
                         f"{r0['settings'].get(key)!r}; only evaluations of the same protocol pair task by task")
        if r["tasks"] != r0["tasks"] or r["seeds"] != r0["seeds"]:
            sys.exit(f"compare_pooled: {name} and {first} hold different tasks or seeds")
    return loaded


def find(loaded: list[tuple[str, dict]], label: str) -> tuple[dict, str]:
    """(results, agent label) of ``label`` or ``RESULTS_DIR:LABEL``; exits in one line if absent or ambiguous."""
    where, sep, bare = label.rpartition(":")
    if sep and any(name == where.rstrip("/") for name, _ in loaded):
        loaded, label = [(n, r) for n, r in loaded if n == where.rstrip("/")], bare
    hits = [(n, r) for n, r in loaded if label in r["agents"]]
    if not hits:
        valid = ", ".join(a for _, r in loaded for a in r["agents"])
        sys.exit(f"compare_pooled: no agent {label!r} in the results; valid: {valid}")
    if len(hits) > 1:
        sys.exit(f"compare_pooled: agent {label!r} is in {' and '.join(n for n, _ in hits)}; name it as "
                 f"RESULTS_DIR:LABEL")
    return hits[0][1], label


def pooled(loaded: list[tuple[str, dict]], labels: list[str], episode: int) -> np.ndarray:
    """(tasks, seeds): success in ``episode`` (1-based) averaged over the replicate agents ``labels``."""
    r0 = loaded[0][1]
    n = r0["settings"]["adaptation_episodes"] + r0["settings"]["evaluation_episodes"]
    if not 1 <= episode <= n:
        sys.exit(f"compare_pooled: --episode {episode} is outside 1..{n}")
    arrays = []
    for label in labels:
        results, agent = find(loaded, label)
        arrays.append(episode_array(results["records"], agent, "success", len(results["tasks"]), results["seeds"],
                                    n)[episode - 1])
    return np.mean(arrays, axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results directories (or results.json files) of one protocol")
    p.add_argument("--a", nargs="+", required=True, help="agent labels of learner A's replicates")
    p.add_argument("--b", nargs="+", required=True, help="agent labels of learner B's replicates")
    p.add_argument("--episode", type=int, required=True, help="episode (1-based) to compare")
    args = p.parse_args(argv)
    loaded = load_all(args.results)
    results = loaded[0][1]
    a, b = pooled(loaded, args.a, args.episode), pooled(loaded, args.b, args.episode)
    fmt = lambda c, sign="+": f"{c[0]:{sign}.2f} [{c[1]:{sign}.2f}, {c[2]:{sign}.2f}]"  # noqa: E731
    won, lost, tasks, p_sign = won_lost(a - b)
    print(f"episode {args.episode}, {len(results['tasks'])} {results['settings']['split']} tasks x seeds "
          f"{results['seeds']}; A = mean of {len(args.a)} runs, B = mean of {len(args.b)} runs")
    print(f"A {fmt(bootstrap_ci(a), '')}  B {fmt(bootstrap_ci(b), '')}")
    print(f"A - B {fmt(bootstrap_ci(a - b))}; tasks won {won}, lost {lost} of {tasks}; sign test p {p_sign:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
