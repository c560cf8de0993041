"""The ``icl-metarl`` command line: one subcommand per stage of a study.

Each subcommand is a ``_add_<name>(subparsers)`` function that declares its options and the handler
it calls; the handlers import the heavy modules lazily so ``icl-metarl --help`` stays fast. Bad user
input raises ``UsageError`` anywhere below and is printed here as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from icl_metarl.harness.errors import UsageError


def _add_suites(sub) -> None:
    p = sub.add_parser("suites", help="list the suites and their train/test environments")
    p.add_argument("suite", nargs="?", help="one suite to show, e.g. ML10 or ML1:reach-v3")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed for the task lists")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="play the scripted expert (told the goal) and a random policy on N tasks and print success")
    p.add_argument("--split", default="test", help="split for --check: train or test")
    p.add_argument("--episode-length", type=int, default=500, help="episode length for --check")
    p.set_defaults(handler=_run_suites)


def _run_suites(args) -> None:
    from icl_metarl.harness.suites import check_episode_length, check_split, env_names, get_suite

    check_split(args.split)
    check_episode_length(args.episode_length)
    if args.check < 0:
        raise UsageError(f"--check must be >= 0 tasks, got {args.check}")
    if args.suite is None:
        for name in ("ML10", "ML45"):
            s = get_suite(name)
            print(f"{name}: {len(s.train_envs)} train environments, {len(s.test_envs)} test environments")
            print(f"  test: {', '.join(s.test_envs)}")
        print(f"ML1:<env>: 50 train and 50 test goals of one environment; env is one of {len(env_names())}:")
        for i in range(0, len(env_names()), 6):
            print("  " + ", ".join(env_names()[i : i + 6]))
        print("`icl-metarl suites NAME` shows one suite with its task counts.")
        return
    s = get_suite(args.suite)
    print(f"{s.name}")
    for split in ("train", "test"):
        tasks = s.tasks(split, args.seed)
        print(f"  {split}: {len(tasks)} tasks over {len(s.envs(split))} environments (seed {args.seed})")
        print(f"    {', '.join(s.envs(split))}")
    if args.check:
        from icl_metarl.harness.suites import check_suite

        tasks = s.tasks(args.split, args.seed)[: args.check]
        r = check_suite(tasks, args.episode_length, seed=args.seed)
        print(f"check on {len(tasks)} {args.split} tasks, episodes of {args.episode_length} steps "
              f"(goal hidden in every observation: {r['goal_hidden']}):")
        print(f"  expert told the goal: success {r['expert_success']:.2f}; random: success {r['random_success']:.2f}; "
              f"{r['steps_per_s']:.0f} env steps/s")


def _add_generate(sub) -> None:
    from dataclasses import fields

    from icl_metarl.incontext.histories import NOISE_KINDS, NOISE_SCHEDULES, GenerateConfig

    d = {f.name: f.default for f in fields(GenerateConfig)}
    p = sub.add_parser("generate", help="play annealed-noise expert trials and store them as histories")
    p.add_argument("--suite", default=d["suite"], help=f"ML1:<env>-v3, ML10 or ML45 (default {d['suite']})")
    p.add_argument("--out", required=True, help="histories directory; rerun the same command to finish it")
    p.add_argument("--split", default=d["split"], help="train (default) or test (held-out histories)")
    p.add_argument("--task-pool", default=d["task_pool"],
                   help="benchmark (the split's tasks, default), N (N distinct new train tasks), fresh (one per trial)")
    p.add_argument("--trials", type=int, default=d["trials"], help=f"trials to play (default {d['trials']})")
    p.add_argument("--episodes", type=int, default=d["episodes_per_trial"],
                   help=f"episodes per trial (default {d['episodes_per_trial']})")
    p.add_argument("--episode-length", type=int, default=d["episode_length"],
                   help=f"steps per episode (default {d['episode_length']})")
    p.add_argument("--noise-kind", default=d["noise_kind"], help=f"{' or '.join(NOISE_KINDS)} (default {d['noise_kind']})")
    p.add_argument("--noise-schedule", default=d["noise_schedule"],
                   help=f"{', '.join(NOISE_SCHEDULES)}: noise from --noise-max in episode 1 to 0 in the last, or (random) "
                        f"drawn from [0, --noise-max] for every episode (default {d['noise_schedule']})")
    p.add_argument("--noise-max", type=float, default=d["noise_max"], help=f"first episode's noise level (default {d['noise_max']})")
    p.add_argument("--trials-per-shard", type=int, default=d["trials_per_shard"],
                   help=f"trials per shard (default {d['trials_per_shard']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of noise, task order and pool (default 0)")
    p.add_argument("--suite-seed", type=int, default=d["suite_seed"], help="Meta-World benchmark seed (default 0)")
    p.add_argument("--workers", type=int, default=d["workers"], help="worker processes (default 0 = one per core)")
    p.set_defaults(handler=_run_generate)


def _run_generate(args) -> None:
    from icl_metarl.incontext.histories import GenerateConfig, generate

    cfg = GenerateConfig(
        suite=args.suite, split=args.split, task_pool=args.task_pool, trials=args.trials,
        episodes_per_trial=args.episodes, episode_length=args.episode_length, noise_kind=args.noise_kind,
        noise_schedule=args.noise_schedule, noise_max=args.noise_max, trials_per_shard=args.trials_per_shard,
        seed=args.seed, suite_seed=args.suite_seed, workers=args.workers,
    )
    generate(cfg, args.out)


def _add_pretrain(sub) -> None:
    from icl_metarl.incontext.train import add_arguments

    p = sub.add_parser("pretrain", help="pretrain the in-context policy on histories (same as python -m icl_metarl.incontext.train)")
    add_arguments(p)
    p.set_defaults(handler=_run_pretrain)


def _run_pretrain(args) -> None:
    from icl_metarl.incontext.train import run_from_args

    run_from_args(args)


def _add_evaluate(sub) -> None:
    from icl_metarl.harness.evaluation import EvalConfig

    d = EvalConfig()
    p = sub.add_parser("evaluate", help="play agents on the same test tasks and seeds; results.json, report.md, plots")
    p.add_argument("agents", nargs="+", metavar="AGENT",
                   help="baseline name (random, oracle) or checkpoint directory (type read from its config.json)")
    p.add_argument("--suite", required=True, help="ML1:<env>-v3, ML10 or ML45")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("-K", "--adaptation-episodes", type=int, default=d.adaptation_episodes, help="adaptation episodes per trial")
    p.add_argument("-E", "--evaluation-episodes", type=int, default=d.evaluation_episodes, help="evaluation episodes per trial")
    p.add_argument("--episode-length", type=int, default=d.episode_length, help="steps per episode")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="evaluation seeds (envs and agents)")
    p.add_argument("--tasks", type=int, default=None, metavar="N", help="play only the first N tasks of the split")
    p.add_argument("--task-seed", type=int, default=d.task_seed, help="benchmark seed that fixes the task list")
    p.add_argument("--split", default=d.split, help="test, or train as a labelled diagnostic")
    p.add_argument("--vector", default=d.vector, help="sync (one process), async (a process per trial) or pipelined (two worker processes "
                        "stepping half the trials each while the agent acts for the other half; same figures as "
                        "sync with half the --batch-size)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="trials played in parallel")
    p.add_argument("--non-adaptive", action="store_true",
                   help="also evaluate each checkpoint's non-adaptive variant (context wiped / no adaptation step)")
    p.add_argument("--explore-episodes", type=int, default=None, metavar="N",
                   help="in-context checkpoints: explore (a constant random action offset per episode) in the "
                        "first N episodes of each trial (default: the checkpoint's config.json)")
    p.add_argument("--explore-scale", type=float, default=None, metavar="S",
                   help="in-context checkpoints: standard deviation of that offset (default: the checkpoint's)")
    p.add_argument("--agent-threads", type=int, default=None, metavar="N",
                   help="in-context checkpoints: torch CPU threads of each step (default 1, safe on a busy machine; "
                        "2 changed the speed by -1 to +7%% on an idle 2-core machine with --vector sync, docs/benchmarks.md)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args) -> None:
    from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents
    from icl_metarl.harness.report import write_report

    config = EvalConfig(
        suite=args.suite, split=args.split, adaptation_episodes=args.adaptation_episodes,
        evaluation_episodes=args.evaluation_episodes, episode_length=args.episode_length,
        seeds=tuple(args.seeds), num_tasks=args.tasks, task_seed=args.task_seed, batch_size=args.batch_size,
        vector=args.vector, progress=not args.no_progress,
    ).check()
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    config.tasks()  # a bad --tasks fails before any checkpoint is loaded
    in_context = {k: v for k, v in (("explore_episodes", args.explore_episodes), ("explore_scale", args.explore_scale),
                                    ("cpu_threads", args.agent_threads)) if v is not None}
    agents = load_agents(args.agents, non_adaptive=args.non_adaptive, in_context=in_context)
    results = evaluate(agents, config, args.out)
    report = write_report(results, args.out, args.bootstrap)
    for f in results["failures"]:
        print(f"agent {f['agent']} failed at seed {f['seed']}: {f['error']} (earlier records kept)", file=sys.stderr)
    print(f"wrote {args.out}/results.json and {report}")


def _add_sinusoid(sub) -> None:
    p = sub.add_parser("sinusoid", help="few-shot sinusoid regression: meta-train MAML/Meta-SGD/Reptile, evaluate")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = acts.add_parser("train", help="meta-train one algorithm and write a checkpoint directory")
    t.add_argument("--out", required=True, help="checkpoint directory (model.safetensors + config.json)")
    t.add_argument("--algo", help="maml, fomaml, meta-sgd, reptile or pretrain (default maml)")
    # Defaults live in gradient_meta.sinusoid.SinusoidConfig; None here means "take the config's".
    for name, typ, what in (("shots", int, "support points per task K (default 10)"),
                            ("iterations", int, "meta-updates (default 2000; the papers use 70000)"),
                            ("meta-batch", int, "tasks per meta-update, split among processes (default 25)"),
                            ("inner-steps", int, "inner gradient steps (default 1)"),
                            ("inner-lr", float, "inner step size (default 0.01)"),
                            ("meta-lr", float, "meta-optimizer learning rate (default 0.001)"),
                            ("seed", int, "seed of the initial weights and training tasks (default 0)"),
                            ("log-every", int, "print the training loss every N iterations (default 500)")):
        t.add_argument(f"--{name}", type=typ, help=what)
    t.add_argument("--eval-tasks", type=int, default=1000, help="test tasks evaluated after training")
    e = acts.add_parser("evaluate", help="post-adaptation MSE of a checkpoint, with a 95%% CI over test tasks")
    e.add_argument("checkpoint", help="directory written by `icl-metarl sinusoid train`")
    e.add_argument("--shots", type=int, help="support points per test task (default: the training K)")
    e.add_argument("--steps", type=int, default=1, help="inner steps at test time (0: no adaptation)")
    e.add_argument("--tasks", type=int, default=1000, help="number of test tasks")
    e.add_argument("--seed", type=int, default=1234, help="seed of the test tasks")
    p.set_defaults(handler=_run_sinusoid)


def _run_sinusoid(args) -> None:
    from gradient_meta.sinusoid import run_cli

    run_cli(args)


def _add_probe(sub) -> None:
    from dataclasses import fields

    from icl_metarl.probes.probe import CONTEXT_CONDITIONS, ProbeConfig

    d = {f.name: f.default for f in fields(ProbeConfig)}
    p = sub.add_parser("probe", help="attention probes of an in-context policy: where it looks, what it uses")
    p.add_argument("checkpoint", help="in-context policy directory (config.json + model.safetensors)")
    p.add_argument("--suite", default=d["suite"], help=f"ML1:<env>-v3, ML10 or ML45 (default {d['suite']})")
    p.add_argument("--out", required=True, help="output directory: metrics.json, PNG heatmaps, probe.md")
    p.add_argument("--split", default=d["split"], help="test (default) or train tasks")
    p.add_argument("--trials", type=int, default=d["trials"], help=f"parallel trials (default {d['trials']})")
    p.add_argument("--episodes", type=int, default=d["episodes"],
                   help="episodes per trial, >= 2; the last is probed (default: the model's max_context_episodes)")
    p.add_argument("--episode-length", type=int, default=d["episode_length"],
                   help="steps per episode (default: the model's max_episode_length)")
    p.add_argument("--conditions", default=",".join(d["conditions"]),
                   help=f"comma-separated context interventions, any of {', '.join(CONTEXT_CONDITIONS)} (default all)")
    p.add_argument("--no-ablation", action="store_true", help="skip the one-head-zeroed replays")
    p.add_argument("--heads", default="", help="extra heads to draw as query x key maps, e.g. 0.1,2.3 (layer.head)")
    p.add_argument("--seed", type=int, default=d["seed"], help="environment and shuffle seed (default 0)")
    p.add_argument("--suite-seed", type=int, default=d["suite_seed"], help="Meta-World benchmark seed (default 0)")
    p.add_argument("--threads", type=int, default=d["torch_threads"], help=f"torch CPU threads (default {d['torch_threads']})")
    p.set_defaults(handler=_run_probe)


def _run_probe(args) -> None:
    from icl_metarl.probes.probe import ProbeConfig, probe

    heads = []
    for item in filter(None, args.heads.split(",")):
        try:
            layer, head = (int(x) for x in item.split("."))
        except ValueError:
            raise UsageError(f"--heads item {item!r} is not LAYER.HEAD, e.g. 0.1") from None
        heads.append((layer, head))
    cfg = ProbeConfig(
        suite=args.suite, split=args.split, trials=args.trials, episodes=args.episodes,
        episode_length=args.episode_length, conditions=tuple(filter(None, args.conditions.split(","))),
        ablate_heads=not args.no_ablation, heads=tuple(heads), seed=args.seed, suite_seed=args.suite_seed,
        torch_threads=args.threads,
    )
    result = probe(args.checkpoint, config=cfg, progress=print)
    paths = result.save(args.out)
    print(f"probe took {result.timing['total_s']:.0f} s; wrote {', '.join(p.name for p in paths)} to {args.out}")


def _add_meta_train(sub) -> None:
    from gradient_meta.meta_rl import add_arguments

    p = sub.add_parser("meta-train", help="gradient meta-RL (MAML, Meta-SGD, Reptile) on a suite's train tasks; resumable")
    add_arguments(p)
    p.set_defaults(handler=_run_meta_train)


def _run_meta_train(args) -> None:
    from gradient_meta.meta_rl import run_from_args

    run_from_args(args)


def _add_quickstart(sub) -> None:
    from icl_metarl.study.quickstart import add_arguments

    p = sub.add_parser("quickstart", help="the whole study, small, on a CPU: generate, pretrain, MAML, evaluate, probe, report")
    add_arguments(p)
    p.set_defaults(handler=_run_quickstart)


def _run_quickstart(args) -> None:
    from icl_metarl.study.quickstart import run_from_args

    run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icl-metarl",
        description="In-context against gradient-based meta-RL on Meta-World, under one evaluator.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_suites(sub)
    _add_meta_train(sub)
    _add_generate(sub)
    _add_pretrain(sub)
    _add_evaluate(sub)
    _add_sinusoid(sub)
    _add_probe(sub)
    _add_quickstart(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except UsageError as e:
        print(f"icl-metarl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except KeyboardInterrupt:
        print(f"icl-metarl {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
