"""What the expert's labels say on a history directory: the learner's success per episode, how far the
taken actions are from the labels, and how often the label lifts the hand.

    python scripts/label_stats.py data/push-rand runs/PJ/round-1/relabelled runs/PK/round-1/relabelled

Why: on push-v3, Meta-World's scripted expert sends the hand 20 cm above the puck whenever the hand is
more than 2 cm from it in the plane. On the expert's own trajectories that almost never fires; on a
learner's trajectories (relabelling rounds) it fires often, so the labels teach the learner to let go of
the puck (docs/results.md, push-v3). The "lift" column is the fraction of steps whose label has a
z action above ``--lift`` (actions lie in [-1, 1]); both columns count labelled steps only.
"""

from __future__ import annotations

import argparse

import numpy as np

from icl_metarl.incontext.shards import load_histories


def label_stats(path: str, lift: float) -> dict:
    """Success per episode index, mean |taken - label| and the lifting fraction over all shards."""
    h = load_histories(path)
    k, length = int(h.manifest["settings"]["episodes_per_trial"]), h.episode_length
    success, gaps, lifts, steps = [], 0.0, 0, 0
    for shard in h.shards:
        trials = len(shard["episode"]) // (k * length)
        success.append(shard["successes"].reshape(trials, k, length).max(-1))  # (trials, K)
        labelled = ~np.isnan(shard["expert_actions"]).any(-1)  # hand-over trials: the policy's episodes are not
        labels = shard["expert_actions"][labelled]
        gaps += float(np.abs(shard["actions"][labelled] - labels).mean(-1).sum())
        lifts += int((labels[:, 2] > lift).sum())
        steps += int(labelled.sum())
    return {"trials": sum(len(s) for s in success), "success": np.concatenate(success).mean(0),
            "gap": gaps / max(steps, 1), "lift": lifts / max(steps, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="history directories (generated or relabelled)")
    p.add_argument("--lift", type=float, default=0.5, help="z action above which a label counts as lifting")
    args = p.parse_args()
    print(f"{'directory':45s} {'trials':>6s}  success per episode      |taken-label|  label lifts (z>{args.lift})")
    for d in args.dirs:
        s = label_stats(d, args.lift)
        curve = " ".join(f"{x:.2f}" for x in s["success"])
        print(f"{d:45s} {s['trials']:6d}  {curve:23s}  {s['gap']:.3f}         {s['lift']:.3f}")


if __name__ == "__main__":
    main()
