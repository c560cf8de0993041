"""Meta-train a gradient learner until its validation success stops improving (issue 22), as one command.

Alternates two steps until the rule says stop: train the run ``--every`` more iterations (``icl-metarl
train`` with a larger ``--iterations`` extends a run exactly, so a run grown in chunks equals one trained
that long), then play its new snapshot on the validation split (``scripts/budget_curves.py``, which keeps
the points already played). It stops when ``--patience`` points after the best did not beat it (the
best is then the snapshot to play on test), or at ``--max-iterations`` with the run still improving,
which it says. ``--min-iterations`` trains at least that far whatever the curve says (a budget the run
must reach, e.g. the one it is compared at; near zero success the rule can stop a run on noise early). Stopping is decided on counts and validation figures only, never on wall-clock time.

Resumable: kill it and rerun the same command; the run resumes from its last checkpoint and no played
point is played again. The training command comes after ``--`` without ``--iterations``; it must name
its ``--out`` and keep a snapshot at every multiple of ``--every`` (``--checkpoint-every`` dividing it).

    python scripts/train_until_stopped.py --every 80 --max-iterations 1280 --suite ML1:reach-v3 \\
        --episode-length 50 -K 3 -E 1 --tasks 50 --seeds 0 --out curves/reach-reptile-s0 -- \\
        reptile --suite ML1:reach-v3 --task-pool fresh --episode-length 50 --meta-batch 10 \\
        --checkpoint-every 80 --seed 0 --out runs/reptile-s0

Exit code 0 when the run stopped improving, 3 when ``--max-iterations`` came first, 2 on bad input.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import read_json
from icl_metarl.study import cli

STILL_IMPROVING = 3


def _budget_curves():
    """scripts/budget_curves.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("budget_curves", Path(__file__).with_name("budget_curves.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _option(args: list[str], name: str) -> str | None:
    """The value of ``name`` in a command line (``--out X`` or ``--out=X``), or None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_train_args(train: list[str], every: int) -> Path:
    """The run directory of a training command line, after checking what the loop relies on."""
    if not train:
        raise UsageError("no training command after '--' (e.g. -- reptile --suite ML1:reach-v3 ... --out runs/r)")
    if _option(train, "--iterations") is not None:
        raise UsageError("the training command must not give --iterations: this script sets it, --every at a time")
    out = _option(train, "--out")
    if out is None:
        raise UsageError("the training command must name its run directory with --out")
    checkpoint_every = _option(train, "--checkpoint-every")
    if checkpoint_every is None or not checkpoint_every.isdigit() or every % int(checkpoint_every):
        raise UsageError(f"--checkpoint-every {checkpoint_every}: the training command must give one that divides "
                         f"--every {every}, so every point to play has a snapshot")
    return Path(out)


def iteration(run: Path) -> int:
    """The iteration the run's last checkpoint holds (0 before the first)."""
    config = run / "config.json"
    return int(read_json(config).get("iteration", 0)) if config.is_file() else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, train = argv[:split], argv[split + 1:]
    curves = _budget_curves()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] --out CURVES -- TRAIN-COMMAND (without --iterations)")
    p.add_argument("--every", type=int, required=True, help="iterations between two validation points")
    p.add_argument("--max-iterations", type=int, required=True, help="stop here even if still improving")
    p.add_argument("--min-iterations", type=int, default=0, help="train at least this far even if stopped earlier")
    p.add_argument("--patience", type=int, default=2, help="points after the best that must fail to beat it")
    p.add_argument("--out", required=True, help="budget curves directory (curves.json, the plot, the evaluations)")
    curves.add_play_arguments(p)  # how each point is played: budget_curves.py's flags, passed on to it
    args = p.parse_args(own)
    try:
        curves.play_config(args)  # bad play settings fail here, not after the first chunk of training
        if not 1 <= args.every <= args.max_iterations or args.patience < 1 or args.min_iterations > args.max_iterations:
            raise UsageError(f"--every {args.every} / --min-iterations {args.min_iterations} / --max-iterations "
                             f"{args.max_iterations} / --patience {args.patience}: need 1 <= every <= max-iterations, "
                             f"min-iterations <= max-iterations and patience >= 1")
        run = check_train_args(train, args.every)
    except UsageError as e:
        print(f"train_until_stopped: error: {e}", file=sys.stderr)
        return 2
    curve_args = [str(run), *curves.play_argv(args), "--every", str(args.every), "--patience", str(args.patience),
                  "--out", args.out]
    at = iteration(run)
    while True:
        if at > 0:
            print(f"$ python scripts/budget_curves.py {shlex.join(curve_args)}", flush=True)
            if (rc := curves.main(curve_args)) != 0:
                return rc
            chosen = read_json(Path(args.out) / "curves.json")["chosen"][str(run)]
            if chosen["stopped_improving"] and at >= args.min_iterations:
                print(f"{run}: stopped improving at iteration {at}; play {chosen['point']} on test "
                      f"({chosen['success_last'][0]:.2f} on {args.split})", flush=True)
                return 0
        if at >= args.max_iterations:
            print(f"{run}: still improving at --max-iterations {args.max_iterations} (best {chosen['point']}, "
                  f"{chosen['points_after']} point(s) after it); not converged by the rule", flush=True)
            return STILL_IMPROVING
        target = min(args.max_iterations, (at // args.every + 1) * args.every)
        command = ["train", *train, "--iterations", str(target)]
        print(f"$ icl-metarl {shlex.join(command)}", flush=True)
        if (rc := cli.main(command)) != 0:
            return rc
        at = iteration(run)
        if at != target:  # the trainer stopped short without an error: do not loop on it
            print(f"train_until_stopped: error: {run} is at iteration {at} after training to {target}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
