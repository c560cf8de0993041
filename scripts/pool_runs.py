"""Pool replicate runs of one recipe (e.g. training seeds): the in-context agent minus its wiped variant,
per episode, averaged over the runs task by task, with a bootstrap interval over tasks (then runs).

One run's evaluation says how that run did; whether a *recipe* beats its wiped variant needs its
replicates together. Each argument is ``RESULTS_DIR:AGENT`` (the label in that results.json, e.g.
``results/PH2s2:"icl #2"``); its non-adaptive variant is found by checkpoint. All runs must have been
evaluated on the same tasks and seeds.

    python scripts/pool_runs.py results/PH2b:icl results/PH2s1:"icl #2" results/PH2s2:"icl #2"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from icl_metarl.harness.report import bootstrap_ci, episode_array, won_lost


def load_pair(spec: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(episodes, tasks, seeds) success of the agent and of its non-adaptive variant."""
    where, _, label = spec.partition(":")
    path = Path(where) / "results.json" if Path(where).is_dir() else Path(where)
    if not path.is_file() or not label:
        sys.exit(f"pool_runs: {spec!r} is not RESULTS_DIR:AGENT with a results.json in RESULTS_DIR")
    r = json.loads(path.read_text())
    agents = r["agents"]
    if label not in agents:
        sys.exit(f"pool_runs: no agent {label!r} in {path}; it has {', '.join(agents)}")
    wiped = [a for a, info in agents.items() if info["spec"] == agents[label]["spec"] and not info["adaptive"]]
    if not agents[label]["adaptive"] or not wiped:
        sys.exit(f"pool_runs: {label!r} in {path} is not an adaptive agent evaluated with --non-adaptive")
    s = r["settings"]
    n = s["adaptation_episodes"] + s["evaluation_episodes"]
    get = lambda a: episode_array(r["records"], a, "success", len(r["tasks"]), r["seeds"], n)  # noqa: E731
    return get(label), get(wiped[0]), {"tasks": r["tasks"], "seeds": r["seeds"], "K": s["adaptation_episodes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="RESULTS_DIR:AGENT, one per replicate run")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args()
    pairs = [load_pair(spec) for spec in args.runs]
    first = pairs[0][2]
    if any(meta["tasks"] != first["tasks"] or meta["seeds"] != first["seeds"] for _, _, meta in pairs):
        sys.exit("pool_runs: the runs were evaluated on different tasks or seeds; pool only like with like")
    # (runs, episodes, tasks, seeds) -> per run the seed mean, then (episodes, tasks, runs)
    agent = np.stack([a for a, _, _ in pairs]).mean(axis=3).transpose(1, 2, 0)
    wiped = np.stack([w for _, w, _ in pairs]).mean(axis=3).transpose(1, 2, 0)
    print(f"{len(pairs)} runs pooled, {len(first['tasks'])} tasks, seeds {first['seeds']}; "
          "interval: tasks resampled, then runs within tasks")
    print("episode | agent | wiped | agent minus wiped | tasks won / lost (runs averaged), sign test p")
    for e in range(agent.shape[0]):
        won, lost, _, p_sign = won_lost(agent[e] - wiped[e])
        a, w, d = (bootstrap_ci(x, args.bootstrap) for x in (agent[e], wiped[e], agent[e] - wiped[e]))
        tag = " (last adaptation)" if e == first["K"] - 1 else ""
        print(f"{e + 1}{tag} | {a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}] | {w[0]:.2f} | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"
              f" | {won} / {lost}, p {p_sign:.3f}")


if __name__ == "__main__":
    main()
