#!/usr/bin/env python
"""The action loss of in-context checkpoints on histories none of them trained on, on windows shaped as each
run's training (docs/ml10.md, session 32: a wider model against the recipe's, both after pretraining only, on a
relabelling round's trials of new tasks). Prints one line per run and writes ``--out`` (JSON) atomically.

    python scripts/heldout_loss.py studies/ml10-cpu-s0/pretrain-norm studies/ml10-cpu-s0/pretrain-norm-d128 \\
        --data studies/ml10-cpu-s0/pretrain-norm-dagger/round-1/relabelled --windows 320 --out results/x.json
"""

import argparse
import sys
import time
from pathlib import Path

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import atomic_write_json
from icl_metarl.incontext.model import ICLPolicy
from icl_metarl.incontext.train import heldout_loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="in-context checkpoint directories")
    ap.add_argument("--data", nargs="+", required=True, help="histories directories the runs never trained on")
    ap.add_argument("--windows", type=int, default=512, help="windows scored, the first ones in the data's order")
    ap.add_argument("--out", help="JSON file for the figures")
    args = ap.parse_args(argv)
    try:
        if args.windows < 1:
            raise UsageError(f"--windows must be >= 1, got {args.windows}")
        rows = []
        for run in args.runs:
            if not (Path(run) / "config.json").is_file():
                raise UsageError(f"{run} is not an in-context checkpoint directory (no config.json)")
            t0 = time.process_time()
            model = ICLPolicy.from_pretrained(run)
            loss = heldout_loss(run, args.data, max_windows=args.windows, model=model)
            params = sum(p.numel() for p in model.parameters())
            rows.append({"run": run, "parameters": params, "loss": loss, "cpu_s": time.process_time() - t0})
            print(f"{run}: {params:,} parameters, held-out loss {loss:.4f} ({rows[-1]['cpu_s']:.0f} CPU-s)", flush=True)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_json(Path(args.out), {"data": args.data, "windows": args.windows, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
