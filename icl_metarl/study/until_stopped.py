"""Train a gradient learner until its validation success stops improving (issue 22):
``icl-metarl train LEARNER ... --until-stopped CURVES``.

Alternates two steps until the rule says stop: train the run ``every`` more iterations (a larger
``iterations`` extends a run exactly, so a run grown in chunks equals one trained that long), then play
its new snapshot on the validation split (``curves.play_curves``, which keeps the points already played).
It stops when ``patience`` points after the best did not beat it (the best is then the snapshot to play on
test), or at the training's own ``--iterations`` with the run still improving, which it says.
``min_iterations`` trains at least that far whatever the curve says (a budget the run must reach, e.g.
the one it is compared at; near zero success the rule can stop a run on noise early). Stopping is decided
on counts and validation figures only, never on wall-clock time. Resumable: kill it and rerun the same
command; the run resumes from its last checkpoint and no played point is played again.

Not for: choosing what a curve plays (``curves.py``) or training itself (the learner's, via the registry).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from icl_metarl.harness import registry
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig
from icl_metarl.harness.files import read_json
from icl_metarl.study.curves import play_curves

#: exit code of a run that reached its --iterations still improving
STILL_IMPROVING = 3


def iteration(run: Path) -> int:
    """The iteration the run's last checkpoint holds (0 before the first)."""
    config = run / "config.json"
    return int(read_json(config).get("iteration", 0)) if config.is_file() else 0


def check_rule(config, every: int, patience: int, min_iterations: int) -> None:
    """A UsageError unless the rule can run on this training's settings: every point to play needs a
    snapshot (``checkpoint_every`` divides ``every``) and the cap (``iterations``) is reachable."""
    cap = config.iterations
    if not 1 <= every <= cap or patience < 1 or min_iterations > cap:
        raise UsageError(f"--every {every} / --min-iterations {min_iterations} / --iterations {cap} / --patience "
                         f"{patience}: need 1 <= every <= iterations, min-iterations <= iterations and patience >= 1")
    if every % config.checkpoint_every:
        raise UsageError(f"--checkpoint-every {config.checkpoint_every} must divide --every {every}, so every point "
                         f"to play has a snapshot")


def train_until_stopped(learner: str, config, out, curves, play: EvalConfig, deterministic: bool = False,
                        every: int | None = None, patience: int = 2, min_iterations: int = 0) -> int:
    """Grow the run ``out`` of ``learner`` in chunks of ``every`` iterations (default: its checkpoint
    interval) up to ``config.iterations``, playing each new snapshot with ``play`` into ``curves``.

    Returns 0 when the run stopped improving, ``STILL_IMPROVING`` when the cap came first."""
    every = config.checkpoint_every if every is None else every
    check_rule(config, every, patience, min_iterations)
    play.check()  # bad play settings fail here, not after the first chunk of training
    run, cap = Path(out), config.iterations
    at, chosen = iteration(run), None
    while True:
        if at > 0:
            chosen = play_curves([str(run)], play, curves, deterministic, every, patience)[str(run)]
            if chosen["stopped_improving"] and at >= min_iterations:
                print(f"{run}: stopped improving at iteration {at}; play {chosen['point']} on test "
                      f"({chosen['success_last'][0]:.2f} on {play.split})", flush=True)
                return 0
        if at >= cap:
            print(f"{run}: still improving at --iterations {cap} (best {chosen['point']}, "
                  f"{chosen['points_after']} point(s) after it); not converged by the rule", flush=True)
            return STILL_IMPROVING
        target = min(cap, (at // every + 1) * every)
        print(f"{run}: training {learner} to iteration {target}", flush=True)
        registry.train(learner, dataclasses.replace(config, iterations=target), run)
        at = iteration(run)
        if at != target:  # the trainer stopped short without an error: do not loop on it
            raise UsageError(f"{run} is at iteration {at} after training to {target}")
