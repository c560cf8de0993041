"""The ``icl-metarl`` command line: one subcommand per stage of a study and per workflow (``curves``,
``train LEARNER --until-stopped``, ``compare``, ``crosscheck``), its flags made from settings dataclasses
(``harness.settings``) and its learners read from the registry (``harness.registry``).

What a command runs is named as ``"module:function"`` and imported only when the command runs, so that
``icl-metarl --help`` and every subcommand's ``--help`` answer without importing torch (tested). Bad user
input raises ``UsageError`` anywhere below and is printed here as one line, exit code 2. Torch's CPU thread
count is set here, once per command, from its ``--threads`` (``_run``); nothing below sets it for the process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

from gradient_meta.config import MetaRLConfig, SinusoidConfig
from icl_metarl.fewshot.config import FewShotEvalConfig, FewShotProbeConfig, FewShotTrainConfig
from icl_metarl.harness import registry
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig
from icl_metarl.harness.settings import COMMAS, FLAGS, add_arguments, from_args
from icl_metarl.incontext.config import GenerateConfig
from icl_metarl.probes.config import ProbeConfig
from icl_metarl.study.config import QuickstartCommand


@dataclass
class SuitesCommand:
    """What ``icl-metarl suites`` shows, and what its ``--check`` plays."""

    seed: int = 0
    """benchmark seed for the task lists (and the evaluation seed of --check)"""
    check: int = 0
    """play the scripted expert (told the goal) and a random policy on this many tasks of every environment of the
    suite, through the evaluator: success and steps to first success per environment (env steps/s to stderr)"""
    split: tuple[str, ...] = ("test",)
    """splits for --check: train, validation, test (several: one table row per split and environment)"""
    episode_length: int = 500
    """episode length for --check; the steps to first success tell which length a study may use"""
    action_repeats: tuple[int, ...] = (1,)
    """decision intervals k for --check (the expert acts every k-th simulator step, its action held in between);
    several: a last table of each environment's success at every k relative to the first k"""
    random: bool = True
    """--check also plays a random policy (at the first of --action-repeats): the floor beside the expert"""
    threshold: float = 0.9
    """--check lists the environments whose expert success is below this"""
    keep: float = 0.95
    """with several --action-repeats: the largest k at which every environment keeps this fraction of its success
    at the first k"""
    out: str | None = None
    """--check writes each evaluation (results.json, report.md) under OUT/SPLIT, or OUT/kK/SPLIT with several
    --action-repeats; an evaluation already there is read, not played again"""
    expert_goal_offsets: tuple[str, ...] = field(default=(), metadata={COMMAS: False})
    """ENV=x,y,z (metres): --check tells the expert of ENV the goal shifted by this, as a study configuration's
    expert_goal_offsets does (suites.MEASURED_GOAL_OFFSETS); each ENV an environment of the suite"""


@dataclass
class EvaluateCommand:
    """What ``icl-metarl evaluate`` adds to the evaluation settings."""

    non_adaptive: bool = False
    """also evaluate each checkpoint's non-adaptive variant (context wiped / no adaptation step)"""
    replay_best: bool = False
    """also evaluate each agent's replay-best variant: it plays the K adaptation episodes as the agent does,
    then replays, open loop, the actions of its highest-return adaptation episode in every evaluation
    episode (what the agent found, kept perfectly: a trial's episodes start from one state)"""
    bootstrap: int = 2000
    """bootstrap resamples for the 95% intervals"""


@dataclass
class CompareCommand:
    """What ``icl-metarl compare`` computes besides the runs it is given."""

    episode: str = ""
    """episode of the trial to compare: its 1-based index (e.g. the last adaptation episode), 'evaluation',
    each trial's mean over its evaluation episodes (Meta-World's figure), or 'replay-best', the success of
    its highest-return adaptation episode (what replaying that episode in the evaluation episodes scores)"""
    against_non_adaptive: bool = False
    """B: each of A's runs without adaptation (its non-adaptive variant in the same evaluation), instead of --b"""
    bootstrap: int = 2000
    """bootstrap resamples for the 95% intervals"""
    per_env: bool = False
    """also a table per environment of the tasks (ML10, ML45): A, B and A minus B over its tasks alone"""


@dataclass
class SinusoidEvaluateCommand:
    """What ``icl-metarl fewshot sinusoid evaluate`` plays."""

    shots: int | None = None
    """support points per test task (None: the training K)"""
    steps: int = 1
    """inner steps at test time (0: no adaptation)"""
    tasks: int = 1000
    """number of test tasks"""
    seed: int = 1234
    """seed of the test tasks"""


@dataclass
class SinusoidTableCommand:
    """What ``icl-metarl fewshot sinusoid table`` trains and shows (the Meta-SGD paper's Table 1)."""

    shots: tuple[int, ...] = (5, 10, 20)
    """K: support points per task, one column each"""
    algos: tuple[str, ...] = ("pretrain", "maml", "meta-sgd")
    """algorithms, one row each"""
    iterations: int = 20000
    """meta-updates per run (the paper: 70,000)"""
    eval_tasks: int = 1000
    """test tasks of each run's one-step MSE"""
    seed: int = 0
    """seed of every run's weights and training tasks"""
    report: tuple[str, ...] = field(default=(), metadata={COMMAS: False})
    """train nothing: the table from the results.json files of earlier runs"""


@dataclass
class CurvePlay:
    """How every point of a budget curve is played: the same tasks, episodes and seeds for every snapshot."""

    suite: str = "ML1:reach-v3"
    """Meta-World suite"""
    split: str = "validation"
    """validation (choose there); test only for a final recipe"""
    adaptation_episodes: int = field(default=3, metadata={FLAGS: ("-K",)})
    """K: adaptation episodes per trial"""
    evaluation_episodes: int = field(default=1, metadata={FLAGS: ("-E",)})
    """E: evaluation episodes after them"""
    episode_length: int = 50
    """simulator steps per episode"""
    seeds: tuple[int, ...] = (0,)
    """evaluation seeds"""
    tasks: int = 50
    """the first N tasks of the split"""
    task_seed: int = 0
    """benchmark seed whose split is played (the test goals and the validation tasks depend on it)"""
    deterministic: bool = False
    """gradient agents act with their mean action once adapted"""

    def eval_config(self) -> EvalConfig:
        """The checked evaluation settings (UsageError if bad)."""
        return EvalConfig(suite=self.suite, split=self.split, adaptation_episodes=self.adaptation_episodes,
                          evaluation_episodes=self.evaluation_episodes, episode_length=self.episode_length,
                          seeds=tuple(self.seeds), num_tasks=self.tasks, task_seed=self.task_seed, batch_size=self.tasks,
                          progress=False).check()


@dataclass
class CurvesCommand:
    """Which snapshots ``icl-metarl curves`` plays and when a run has stopped improving."""

    every: int = 1
    """play only snapshots whose iteration is a multiple of this (and the run's final one)"""
    patience: int = 2
    """a run has stopped improving when this many points after its best did not beat it"""
    reuse: tuple[str, ...] = field(default=(), metadata={COMMAS: False})
    """earlier --out directories played with the same settings: their points of these runs are taken, not played
    again (one plot and one choice over runs curved apart)"""


@dataclass
class UntilStopped:
    """``train LEARNER --until-stopped CURVES``: grow the run in chunks until its validation curve stops rising."""

    until_stopped: str | None = None
    """budget-curves directory: train --every iterations at a time up to --iterations, playing each new snapshot
    (the training's suite and episode length) into it, until --patience points after the best fail to beat it
    (exit 0; exit 3 if --iterations comes first); rerun the same command to resume"""
    every: int | None = None
    """with --until-stopped: iterations between two validation points (None: --checkpoint-every, which must
    divide it)"""
    patience: int = 2
    """with --until-stopped: points after the best that must fail to beat it"""
    min_iterations: int = 0
    """with --until-stopped: train at least this far even if the rule stopped the run earlier"""


def _run(target, *args, threads: int = 0):
    """Run a command: torch's CPU threads for this process (0: torch's default, torch not imported for it),
    then ``target`` (a function, or ``"module:function"`` imported only now) called with ``args``."""
    if threads:
        registry.resolve("icl_metarl.harness.threads:use_threads")(threads)
    return (registry.resolve(target) if isinstance(target, str) else target)(*args)


def _add_threads(p, default: int | None, what: str) -> None:
    """``--threads`` for a command whose settings hold no thread count of their own."""
    p.add_argument("--threads", type=int, default=default, metavar="THREADS",
                   help=f"torch CPU threads of this command ({what})")


# ----------------------------------------------------------------------------------- commands
def _add_suites(sub) -> None:
    p = sub.add_parser("suites", help="list the suites and their train/test environments")
    p.add_argument("suite", nargs="?", help="one suite to show, e.g. ML10 or ML1:reach-v3")
    add_arguments(p, SuitesCommand)
    p.set_defaults(handler=lambda a: _run("icl_metarl.study.commands:suites", a.suite, from_args(SuitesCommand, a)))


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="play annealed-noise expert trials and store them as histories")
    add_arguments(p, GenerateConfig)
    p.add_argument("--out", required=True, help="histories directory; rerun the same command to finish it")
    p.set_defaults(handler=lambda a: _run("icl_metarl.incontext.histories:generate", from_args(GenerateConfig, a),
                                          a.out))


def _add_learner(sub, learner: registry.Learner, command: str | None = None, summary: str | None = None) -> None:
    p = sub.add_parser(command or learner.name, help=summary or learner.summary)
    add_arguments(p, learner.config, skip=("out", *learner.fixed), required=_required(learner.config))
    p.add_argument("--out", required=True, help="checkpoint directory; rerun the same command to resume it")
    if "threads" not in {f.name for f in dataclasses.fields(learner.config)}:
        _add_threads(p, learner.threads, f"default: the learner's, {learner.threads or 'torch default'}")
    if _grows_in_chunks(learner.config):
        group = p.add_argument_group("until stopped", "grow the run in chunks, each new snapshot played on the "
                                     "validation split (icl-metarl curves), until it stops improving")
        add_arguments(group, UntilStopped)
        add_arguments(group, CurvePlay, skip=_FROM_TRAINING)
    p.set_defaults(handler=lambda a: _train(learner, a))


#: what a run grown --until-stopped is played with: its training's own (play's field: the training's)
_FROM_TRAINING = {"suite": "suite", "episode_length": "episode_length", "task_seed": "suite_seed"}


def _grows_in_chunks(cls) -> bool:
    """Whether a learner's runs can be grown in chunks and played as curves: a larger ``iterations`` extends
    a run, each checkpoint leaves a snapshot, and the run names the suite, episode length and benchmark seed to
    play."""
    return {"iterations", "checkpoint_every", *_FROM_TRAINING.values()} <= {f.name for f in dataclasses.fields(cls)}


def _train(learner: registry.Learner, a) -> int | None:
    config = from_args(learner.config, a, **learner.fixed)
    threads = a.threads  # the settings' own, or --threads (default: the learner's)
    if not _grows_in_chunks(learner.config):
        _run(registry.train, learner.name, config, a.out, threads=threads)
        return None
    rule, play = from_args(UntilStopped, a), from_args(CurvePlay, a)
    if rule.until_stopped is None:
        given = [f.name for cls in (UntilStopped, CurvePlay) for f in dataclasses.fields(cls)
                 if f.name not in _FROM_TRAINING and getattr(a, f.name) != getattr(cls(), f.name)]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} is a setting of --until-stopped, which is not given")
        _run(registry.train, learner.name, config, a.out, threads=threads)
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--until-stopped runs in one process (it plays the curve between chunks of training)")
    play = dataclasses.replace(play, **{name: getattr(config, own) for name, own in _FROM_TRAINING.items()})
    return _run("icl_metarl.study.until_stopped:train_until_stopped", learner.name, config, a.out, rule.until_stopped,
                play.eval_config(), play.deterministic, rule.every, rule.patience, rule.min_iterations,
                threads=threads)


def _required(cls) -> tuple[str, ...]:
    """Fields of a learner's settings without a usable default (an empty list of data directories)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name == "data")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a learner (one subcommand per registered learner)")
    learners = p.add_subparsers(dest="learner", required=True, metavar="LEARNER")
    for learner in registry.discover().values():
        _add_learner(learners, learner)


def _add_meta_train(sub) -> None:
    p = sub.add_parser("meta-train", help="alias of `train ALGO` for ALGO = maml, meta-sgd, reptile (kept for older "
                                          "command lines)")
    add_arguments(p, MetaRLConfig)
    p.add_argument("--out", required=True, help="run directory; rerun the same command to resume it")
    _add_threads(p, None, "default: the learner's, 1")
    p.set_defaults(handler=lambda a: _run(registry.train, a.algo, from_args(MetaRLConfig, a), a.out,
                                          threads=registry.get(a.algo).threads if a.threads is None else a.threads))


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="play agents on the same test tasks and seeds; results.json, report.md, plots")
    p.add_argument("agents", nargs="+", metavar="AGENT",
                   help="baseline name (random, oracle) or checkpoint directory (its learner read from config.json)")
    p.add_argument("--out", required=True, help="output directory")
    add_arguments(p, EvalConfig, required=("suite",))
    add_arguments(p, EvaluateCommand)
    for options in registry.agent_option_classes():
        add_arguments(p, options)
    _add_threads(p, 0, "default 0: torch's; an in-context agent holds --agent-threads during each of its steps")
    p.set_defaults(handler=_evaluate)


def _evaluate(a) -> None:
    config = from_args(EvalConfig, a).check()
    command = from_args(EvaluateCommand, a)
    options = {f.name: getattr(a, f.name) for cls in registry.agent_option_classes() for f in dataclasses.fields(cls)}
    _run("icl_metarl.study.commands:evaluate", a.agents, config, command.non_adaptive, command.bootstrap, options,
         a.out, command.replay_best, threads=a.threads)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="two learners' replicate runs (training seeds) from evaluations of one protocol, "
                                       "in one episode: mean and IQM with intervals over runs and tasks, A minus B "
                                       "paired, sign test")
    p.add_argument("results", nargs="+", help="results directories (or results.json files) of one protocol")
    p.add_argument("--a", nargs="+", required=True, metavar="LABEL",
                   help="agent labels of learner A's runs (RESULTS_DIR:LABEL where a label is in several)")
    p.add_argument("--b", nargs="+", metavar="LABEL", help="agent labels of learner B's runs, paired in order with A's")
    add_arguments(p, CompareCommand, required=("episode",))
    p.set_defaults(handler=lambda a: _run("icl_metarl.harness.comparison:compare_command", a.results, a.a, a.b,
                                          a.against_non_adaptive, a.episode, a.bootstrap, a.per_env))


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="report.md and plots of an evaluation again, from its results.json; plays nothing")
    p.add_argument("results", help="results directory (or results.json / results.json.gz file) of `evaluate`")
    p.add_argument("--out", help="directory for report.md and the plots (default: the results directory)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% intervals (default 2000)")
    p.set_defaults(handler=lambda a: _run("icl_metarl.study.commands:report", a.results, a.out, a.bootstrap))


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="attention probes of an in-context policy: where it looks, what it uses")
    p.add_argument("checkpoint", help="in-context policy directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="output directory: metrics.json, PNG heatmaps, probe.md")
    add_arguments(p, ProbeConfig)
    p.set_defaults(handler=lambda a: _run("icl_metarl.study.commands:probe", a.checkpoint, from_args(ProbeConfig, a),
                                          a.out, threads=a.torch_threads))


def _add_curves(sub) -> None:
    p = sub.add_parser("curves", help="learning curves against budget: every snapshot of each run played on the "
                                      "validation split; per run the snapshot to play on test")
    p.add_argument("runs", nargs="+", metavar="RUN", help="training run directories")
    add_arguments(p, CurvePlay)
    add_arguments(p, CurvesCommand)
    p.add_argument("--out", required=True, help="curves directory: curves.json, curves.md, budget_curves.png, the "
                                                "evaluations; rerun the same command to add new snapshots")
    p.set_defaults(handler=_curves)


def _curves(a) -> None:
    play, command = from_args(CurvePlay, a), from_args(CurvesCommand, a)
    _run("icl_metarl.study.curves:play_curves", a.runs, play.eval_config(), a.out, play.deterministic, command.every,
         command.patience, command.reuse)


def _add_crosscheck(sub) -> None:
    p = sub.add_parser("crosscheck", help="our evaluator against Meta-World's own metalearning_evaluation: the same "
                                          "agents, tasks and environment seeds; success rates and their agreement")
    p.add_argument("agents", nargs="*", default=["oracle", "random"], metavar="AGENT",
                   help="baseline name or checkpoint directory (default: oracle random)")
    add_arguments(p, EvalConfig, skip=("seeds", "batch_size", "vector", "progress"),
                  defaults={"adaptation_episodes": 2, "split": "test"})
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (default: 0)")
    p.set_defaults(handler=lambda a: _run("icl_metarl.study.commands:crosscheck", a.agents,
                                          dataclasses.replace(from_args(EvalConfig, a), seeds=(a.seed,),
                                                              progress=False).check()))


def _add_sinusoid(acts) -> None:
    p = acts.add_parser("sinusoid", help="the sinusoid benchmark of the MAML and Meta-SGD papers: one gradient "
                                         "learner at a fixed K (train, evaluate), the Meta-SGD paper's table")
    acts = p.add_subparsers(dest="benchmark_action", required=True, metavar="ACTION")
    t = acts.add_parser("train", help="meta-train one algorithm and write a checkpoint directory")
    add_arguments(t, SinusoidConfig)
    t.add_argument("--out", required=True, help="checkpoint directory (model.safetensors + config.json)")
    t.add_argument("--eval-tasks", type=int, default=1000, help="test tasks evaluated after training (default: 1000)")
    t.set_defaults(handler=lambda a: _run("gradient_meta.sinusoid:train_command", from_args(SinusoidConfig, a),
                                          a.out, a.eval_tasks, threads=a.threads))
    e = acts.add_parser("evaluate", help="post-adaptation MSE of a checkpoint, with a 95%% CI over test tasks")
    e.add_argument("checkpoint", help="directory written by `icl-metarl fewshot sinusoid train`")
    add_arguments(e, SinusoidEvaluateCommand)
    _add_threads(e, 1, "default: 1, as training's: a small net gains nothing from more")
    e.set_defaults(handler=lambda a: _run("gradient_meta.sinusoid:evaluate_command", a.checkpoint,
                                          from_args(SinusoidEvaluateCommand, a), threads=a.threads))
    r = acts.add_parser("table", help="the Meta-SGD paper's Table 1 (K = 5, 10, 20 shots, one inner step): train each "
                                      "algorithm at each K, score it, print the table beside the paper's figures")
    add_arguments(r, SinusoidTableCommand)
    r.add_argument("--out", default="runs/sinusoid-table", help="checkpoints (ALGO-kK) and results.json "
                                                                  "(default: runs/sinusoid-table)")
    _add_threads(r, 1, "default: 1: a small net gains nothing from more")
    r.set_defaults(handler=lambda a: _run("gradient_meta.sinusoid:table_command", from_args(SinusoidTableCommand, a),
                                          a.out, threads=a.threads))


def _add_fewshot(sub) -> None:
    p = sub.add_parser("fewshot", help="few-shot regression: the in-context regressor beside MAML, Meta-SGD, Reptile, "
                                       "pretraining and reference solvers on the same tasks; gradient-descent probe; "
                                       "the papers' sinusoid benchmark")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = acts.add_parser("train", help="train every learner of a study on one task family (a run directory)")
    add_arguments(t, FewShotTrainConfig)
    t.add_argument("--out", required=True, help="run directory; rerun the same command to finish it")
    t.set_defaults(handler=lambda a: _run("icl_metarl.fewshot.train:train_command", from_args(FewShotTrainConfig, a),
                                          a.out, threads=a.threads))
    e = acts.add_parser("evaluate", help="MSE against shots of every learner on the same test tasks and points; "
                                         "results.json, report.md, plots")
    e.add_argument("run", help="run directory written by `icl-metarl fewshot train`")
    add_arguments(e, FewShotEvalConfig)
    e.add_argument("--out", required=True, help="output directory")
    _add_threads(e, 1, "default: 1, as training's: small nets gain nothing from more")
    e.set_defaults(handler=lambda a: _run("icl_metarl.fewshot.evaluation:evaluate_command", a.run,
                                          from_args(FewShotEvalConfig, a), a.out, threads=a.threads))
    r = acts.add_parser("probe", help="does the in-context prediction behave like k gradient steps? metrics.json, "
                                      "probe.md, plots")
    r.add_argument("run", help="run directory with an in-context regressor (icl/)")
    add_arguments(r, FewShotProbeConfig)
    r.add_argument("--out", required=True, help="output directory")
    _add_threads(r, 1, "default: 1: a small net gains nothing from more")
    r.set_defaults(handler=lambda a: _run("icl_metarl.fewshot.probe:probe_command", a.run,
                                          from_args(FewShotProbeConfig, a), a.out, threads=a.threads))
    o = acts.add_parser("pool", help="pool the evaluations (or the probes) of several training seeds: mean over "
                                     "seeds with a t-interval, per-seed values; pooled.json, pooled.md, plots")
    o.add_argument("dirs", nargs="+", help="output directories of `fewshot evaluate` (or of `fewshot probe`), one "
                                         "per training seed, all of one test set")
    o.add_argument("--out", required=True, help="output directory")
    o.set_defaults(handler=lambda a: _run("icl_metarl.fewshot.pool:pool_command", a.dirs, a.out))
    _add_sinusoid(acts)


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole study, small, on a CPU: generate, pretrain, MAML, evaluate, "
                                          "probe, report")
    add_arguments(p, QuickstartCommand)
    p.add_argument("--out", required=True, help="study directory; rerun the same command to reuse finished stages")
    p.set_defaults(handler=lambda a: _run("icl_metarl.study.quickstart:run_command", from_args(QuickstartCommand, a),
                                          a.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icl-metarl",
        description="In-context against gradient-based meta-RL on Meta-World, under one evaluator. "
                    f"Learners: {', '.join(registry.discover())}.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_suites(sub)
    _add_generate(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_compare(sub)
    _add_report(sub)
    _add_curves(sub)
    _add_crosscheck(sub)
    _add_probe(sub)
    _add_fewshot(sub)
    _add_quickstart(sub)
    # aliases kept for older command lines (docs/results.md quotes them): one verb trains, `train LEARNER`
    _add_learner(sub, registry.get("icl"), "pretrain", "alias of `train icl` (kept for older command lines)")
    _add_meta_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except UsageError as e:  # a learner module named by the user cannot be imported
        print(f"icl-metarl: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)  # an exit code (train --until-stopped's), or what the command returned
    except UsageError as e:
        print(f"icl-metarl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except KeyboardInterrupt:
        print(f"icl-metarl {args.command}: interrupted", file=sys.stderr)
        return 130
    return status if type(status) is int else 0


if __name__ == "__main__":
    sys.exit(main())
