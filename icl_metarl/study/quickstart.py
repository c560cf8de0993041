"""The whole study in one command: histories, in-context pretraining, MAML, evaluation of both against the
baselines on the test split, attention probes, and one ``report.md`` linking the tables and figures.

Each stage writes ``DIR/done/<stage>.json`` when it finishes, so a rerun reuses finished stages (and
refuses one finished with other settings); generation, pretraining and meta-training resume a killed run
by themselves. Not for: the stages' own logic, which lives in their modules. Study configurations are
JSON files (``configs/``) read by ``load_config``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from icl_metarl.harness import registry
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import evaluate, load_agents, load_results
from icl_metarl.harness.files import as_json, atomic_write_figure, atomic_write_json, atomic_write_text, read_log
from icl_metarl.harness.report import adaptation_lines, claim_lines, write_report
from icl_metarl.harness.settings import add_arguments, from_args
from icl_metarl.harness.threads import threads_held
from icl_metarl.incontext.histories import generate
from icl_metarl.probes.probe import probe
from icl_metarl.study.commands import launched_processes
from icl_metarl.study.config import (
    DIRS,
    DISTRIBUTED_STAGES,
    DONE_DIR,
    NOT_RESULTS,
    STAGES,
    TRAIN_DIAGNOSTIC_DIR,
    QuickstartCommand,
    QuickstartConfig,
    check_config,
    extra_data_dirs,
    extra_generate_configs,
    stage_config,
    to_dict,
    train_diagnostic_config,
)


# ------------------------------------------------------------------------------- done markers
def stage_settings(cfg: QuickstartConfig, stage: str, out: str | Path) -> dict:
    """What a stage's result depends on (JSON-normal); a finished stage is reused only if it is equal."""
    if stage == "report":
        return {}
    d = asdict(stage_config(cfg, stage, "DIR"))  # paths relative to the study: a moved one still matches
    if stage == "generate" and cfg.generate_extra:
        d["extra"] = [{k: v for k, v in asdict(e).items() if k not in NOT_RESULTS} for e in extra_generate_configs(cfg)]
    for key in NOT_RESULTS:
        d.pop(key, None)
    if stage == "evaluate":
        d["agents"] = [Path(a).name for a in agent_specs(cfg, out)]
        if cfg.train_diagnostic:  # only when set: markers written before the diagnostic existed stay valid
            d["train_diagnostic"] = cfg.train_diagnostic
    return without_unit_interval(as_json(d))


def without_unit_interval(settings: dict) -> dict:
    """Stage settings without a decision interval of 1 (or None, the evaluator's: 1 in a study), in them and
    in their extra history sets: markers written before the setting existed, or while only some stages had
    it, stay valid."""
    drop = lambda d: {k: v for k, v in d.items() if not (k == "action_repeat" and v in (None, 1))}  # noqa: E731
    out = drop(settings)
    if isinstance(out.get("extra"), list):
        out["extra"] = [drop(e) for e in out["extra"]]
    return out


def marker_path(out: str | Path, stage: str) -> Path:
    return Path(out) / DONE_DIR / f"{stage}.json"


def stage_done(out: str | Path, stage: str, settings: dict) -> bool:
    """True if ``stage`` finished in ``out`` with these settings; a finish with others is a UsageError."""
    path = marker_path(out, stage)
    if not path.is_file():
        return False
    try:
        old = without_unit_interval(json.loads(path.read_text())["settings"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return False  # not a marker we wrote whole: redo the stage
    if old != settings:
        key = next(k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        raise UsageError(f"{out} finished stage {stage} with {key}={old.get(key)!r}, not {settings.get(key)!r}; "
                         f"use another --out, or delete {path} to redo it")
    return True


def mark_done(out: str | Path, stage: str, settings: dict, seconds: float, summary: dict) -> None:
    atomic_write_json(marker_path(out, stage), {"stage": stage, "settings": settings, "seconds": round(seconds, 1),
                                                "summary": summary})


# ----------------------------------------------------------------------------------- the stages
def agent_specs(cfg: QuickstartConfig, out: str | Path) -> list[str]:
    """What the evaluation plays: baselines, then the checkpoints this study trains (or already holds)."""
    out = Path(out)
    specs = ["random", "oracle"]
    for stage in ("pretrain", "meta-train"):
        if stage in cfg.stages or marker_path(out, stage).is_file():
            specs.append(str(out / DIRS[stage]))
    return specs


def run_generate(cfg: QuickstartConfig, out: Path) -> dict:
    parts = []
    for config, where in zip([stage_config(cfg, "generate", out), *extra_generate_configs(cfg)],
                             [out / DIRS["generate"], *extra_data_dirs(cfg, out)]):
        manifest = generate(config, where)
        trials = manifest["settings"]["trials"]
        per_episode = np.sum([r["successful_trials_per_episode"] for r in manifest["shards"].values()], 0) / trials
        parts.append({"trials": trials, "expert_success_per_episode": [round(float(x), 3) for x in per_episode]})
    return {**parts[0], "extra": parts[1:]} if len(parts) > 1 else parts[0]


def run_pretrain(cfg: QuickstartConfig, out: Path) -> dict:
    record = registry.train("icl", stage_config(cfg, "pretrain", out), out / DIRS["pretrain"]) or {}
    return {"final_loss": record.get("loss"), "tokens_per_s": record.get("tokens_per_s")}


def run_meta_train(cfg: QuickstartConfig, out: Path) -> dict:
    config = stage_config(cfg, "meta-train", out)
    log = registry.train(config.algo, config, out / DIRS["meta-train"])
    last = log[-1] if log else {}
    return {"success_pre": last.get("success_pre"), "success_post": last.get("success_post")}


def _play(agents, config, where: Path) -> dict | None:
    """One evaluation with its report; None on a process of an accelerate launch other than the main one
    (its share is in <where>/ranks)."""
    results = evaluate(agents, config.check(), where, launched_processes())
    if results is None:
        return None
    write_report(results, where)
    for f in results["failures"]:
        print(f"  agent {f['agent']} failed at seed {f['seed']} ({config.split} split): {f['error']}",
              file=sys.stderr)
    return results


def run_evaluate(cfg: QuickstartConfig, out: Path) -> dict:
    agents = load_agents(agent_specs(cfg, out), non_adaptive=True,
                         options={"expert_goal_offsets": tuple(cfg.expert_goal_offsets)})  # the oracle's
    results = _play(agents, stage_config(cfg, "evaluate", out), out / DIRS["evaluate"])
    summary = {} if results is None else {"agents": list(results["agents"]), "failures": len(results["failures"])}
    if cfg.train_diagnostic:
        train = _play(agents, train_diagnostic_config(cfg, out), out / TRAIN_DIAGNOSTIC_DIR)
        if train is not None:
            summary["train_diagnostic_failures"] = len(train["failures"])
    return summary


def run_probe(cfg: QuickstartConfig, out: Path) -> dict:
    result = probe(out / DIRS["pretrain"], config=stage_config(cfg, "probe", out), progress=lambda m: print(f"  {m}"))
    paths = result.save(out / DIRS["probe"])
    return {"files": [p.name for p in paths], "seconds": round(result.timing["total_s"], 1)}


def run_report(cfg: QuickstartConfig, out: Path) -> dict:
    path = write_quickstart_report(cfg, out)
    return {"report": str(path)}


RUNNERS = {"generate": run_generate, "pretrain": run_pretrain, "meta-train": run_meta_train,
           "evaluate": run_evaluate, "probe": run_probe, "report": run_report}


def stage_threads(cfg: QuickstartConfig, stage: str) -> int:
    """Torch CPU threads a stage runs with (0: the process's own): pretraining the study's ``torch_threads``
    (its pretrain section's ``threads`` first, if set), meta-training its learner's (one), evaluation one
    (its agents act one small step at a time, where more threads wait on each other: docs/benchmarks.md;
    in a whole study it always ran after meta-training's one), probing the probe's; generation and the
    report leave them."""
    if stage == "pretrain":
        return cfg.pretrain.threads or cfg.torch_threads
    if stage == "meta-train":
        return registry.get(cfg.meta_train.algo).threads
    if stage == "evaluate":
        return 1
    if stage == "probe":
        return cfg.probe.torch_threads
    return 0


def run_quickstart(cfg: QuickstartConfig, out: str | Path, say=print) -> Path:
    """Run the configured stages into ``out`` in order, reusing finished ones; returns report.md's path."""
    check_config(cfg)
    out = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = int(os.environ.get("RANK", "0")) == 0
    if world > 1 and any(s not in DISTRIBUTED_STAGES for s in cfg.stages):
        raise UsageError(f"under accelerate launch ({world} processes) run only --stages "
                         f"{','.join(DISTRIBUTED_STAGES)}; got {','.join(cfg.stages)}")
    say = say if main_process else (lambda _m: None)
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        atomic_write_json(out / "quickstart_config.json", to_dict(cfg))
    t_start = time.perf_counter()
    for i, stage in enumerate(cfg.stages, 1):
        head = f"[{i}/{len(cfg.stages)}] {stage}"
        settings = stage_settings(cfg, stage, out)
        if stage != "report" and stage_done(out, stage, settings):
            say(f"{head}: already done in {out}, reused")
            continue
        say(f"{head}: running ({time.perf_counter() - t_start:.0f} s elapsed)")
        t0 = time.perf_counter()
        with threads_held(stage_threads(cfg, stage)):  # put back after the stage: stages do not leak them
            summary = RUNNERS[stage](cfg, out)
        seconds = time.perf_counter() - t0
        if main_process:
            mark_done(out, stage, settings, seconds, summary)
        say(f"{head}: done in {seconds:.0f} s ({time.perf_counter() - t_start:.0f} s elapsed)")
    return out / "report.md"


# -------------------------------------------------------------------------------------- report
def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def _stage_logs(out: Path, stage: str) -> list[Path]:
    """The JSONL logs of a training stage, in order: its log.jsonl, or one per relabelling phase
    (round-r/train/log.jsonl, each counting its steps from 0)."""
    d = out / DIRS[stage]
    if (d / "log.jsonl").is_file():
        return [d / "log.jsonl"]
    return sorted(d.glob("round-*/train/log.jsonl"), key=lambda p: int(p.parts[-3].split("-")[1]))


def _training_logs(out: Path) -> list[str]:
    """The JSONL logs of pretraining and meta-training, relative to out."""
    return [f.relative_to(out).as_posix() for stage in ("pretrain", "meta-train") for f in _stage_logs(out, stage)]


def plot_training(out: Path) -> str | None:
    """training.png: pretraining loss and meta-training success (before/after the inner step), if logged."""
    logs, rounds = {}, []
    for stage in ("pretrain", "meta-train"):
        offset, records = 0, []
        for f in _stage_logs(out, stage):  # relabelling phases: steps continue across them
            phase = read_log(f)
            if stage == "pretrain" and phase:
                if records:
                    rounds.append(offset)
                phase = [{**r, "step": r["step"] + offset} for r in phase]
                offset = phase[-1]["step"]
            records += phase
        logs[stage] = records
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    fig = Figure(figsize=(5.5 * len(logs), 3.8))
    axes = fig.subplots(1, len(logs), squeeze=False)
    for ax, (stage, log) in zip(axes[0], logs.items()):
        if stage == "pretrain":
            ax.plot([r["step"] for r in log], [r["loss"] for r in log])
            ax.set_yscale("log")
            for x in rounds:
                ax.axvline(x, color="gray", lw=0.8, ls="--")
            ax.set(xlabel="optimizer step", ylabel="action loss",
                   title="in-context pretraining" + (" (dashes: relabelling rounds)" if rounds else ""))
        else:
            it = [r["iteration"] for r in log]
            ax.plot(it, [r["success_pre"] for r in log], label="before the inner step")
            if "success_post" in log[0]:  # Reptile plays no episodes after its inner steps
                ax.plot(it, [r["success_post"] for r in log], label="after the inner step")
            ax.set(xlabel="meta-iteration", ylabel="success (train tasks)", title="gradient meta-training")
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, out / "training.png", dpi=100)
    return "training.png"


def study_claims(results: dict, out: Path) -> list[str]:
    """The report's first lines: does each trained agent adapt, and which is better in the last episode."""
    label = {}
    for stage in ("pretrain", "meta-train"):
        spec = str(out / DIRS[stage])
        label[stage] = next((a for a, info in results["agents"].items()
                             if info["adaptive"] and Path(info["spec"]).resolve() == Path(spec).resolve()), None)
    adapters = [(label["pretrain"], "its context", "with its context wiped every episode"),
                (label["meta-train"], "its gradient step", "without the step")]
    versus = (label["pretrain"], label["meta-train"])
    return claim_lines(results, [a for a in adapters if a[0]], versus if all(versus) else None)


def write_quickstart_report(cfg: QuickstartConfig, out: str | Path) -> Path:
    """DIR/report.md: the headline figures, with links to the evaluation, training and probe outputs."""
    out = Path(out)
    results_file = out / DIRS["evaluate"] / "results.json"
    results = load_results(results_file) if results_file.is_file() else None
    lines = [f"# {cfg.name}: {cfg.suite}", ""]
    if results:
        lines += study_claims(results, out)
    lines += [f"{cfg.description}. Budget: {cfg.budget}.", "",
              f"Configuration: [quickstart_config.json](quickstart_config.json). Episodes of {cfg.episode_length} "
              f"steps{f' (a decision every {cfg.action_repeat})' if cfg.action_repeat > 1 else ''}, "
              f"benchmark seed {cfg.suite_seed}, study seed {cfg.seed}.", "", "## Stages", "",
              "| stage | output | seconds (when it ran) | summary |", "|---|---|---|---|"]
    for stage in STAGES[:-1]:
        m = marker_path(out, stage)
        if m.is_file():
            d = json.loads(m.read_text())
            summary = ", ".join(f"{k}: {_short(v)}" for k, v in d["summary"].items() if k != "files")
            lines.append(f"| {stage} | [{DIRS[stage]}/]({DIRS[stage]}/) | {d['seconds']:.0f} | {summary} |")
        else:
            lines.append(f"| {stage} | not run | | |")
    lines.append("")

    if results:
        lines += adaptation_lines(results)
        lines += ["## Adaptation curves", "",
                  "Every agent on the same tasks with the same seeds; oracle (told the goal) and random bound the "
                  f"plot. All tables (success definitions, returns, steps to success): [{DIRS['evaluate']}/report.md]"
                  f"({DIRS['evaluate']}/report.md).", ""]
        for name in ("success", "return", "steps_to_success"):
            if (out / DIRS["evaluate"] / f"{name}.png").is_file():
                lines.append(f"![{name}]({DIRS['evaluate']}/{name}.png)")
        lines.append("")

    train_file = out / TRAIN_DIAGNOSTIC_DIR / "results.json"
    if cfg.train_diagnostic and train_file.is_file():
        train = load_results(train_file)
        lines += ["## Train environments (a diagnostic, not a result)", "",
                  f"The same agents, episodes and seeds on {cfg.train_diagnostic} task(s) of each train environment "
                  f"({', '.join(sorted({t['env_name'] for t in train['tasks']}))}): whether they learned what they trained "
                  f"on, beside the {cfg.split} figures above. Per-environment tables: "
                  f"[{TRAIN_DIAGNOSTIC_DIR}/report.md]({TRAIN_DIAGNOSTIC_DIR}/report.md).", ""]
        lines += adaptation_lines(train, heading=None)

    training = plot_training(out)
    if training:
        lines += ["## Training", "", f"![training]({training})", "",
                  "Logs: " + ", ".join(f"[{p}]({p})" for p in _training_logs(out)) + ".", ""]

    probe_dir = out / DIRS["probe"]
    if (probe_dir / "probe.md").is_file():
        lines += ["## Attention probes of the in-context policy", "",
                  f"What it attends to while it adapts and what changes when its context is altered: "
                  f"[{DIRS['probe']}/probe.md]({DIRS['probe']}/probe.md), numbers in "
                  f"[{DIRS['probe']}/metrics.json]({DIRS['probe']}/metrics.json).", ""]
        for png in sorted(probe_dir.glob("*.png")):
            lines.append(f"![{png.stem}]({DIRS['probe']}/{png.name})")
        lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------------------------- command line
def run_command(options: QuickstartCommand, out) -> None:
    """``icl-metarl quickstart`` and ``python -m icl_metarl.study.quickstart``."""
    cfg = options.config_for()
    report = run_quickstart(cfg, out)
    if int(os.environ.get("RANK", "0")) == 0 and "report" in cfg.stages:
        print(f"wrote {report}")


def main(argv: list[str] | None = None) -> int:
    """``python -m icl_metarl.study.quickstart`` (also under ``accelerate launch`` for --stages pretrain)."""
    p = argparse.ArgumentParser(prog="icl_metarl.study.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, QuickstartCommand)
    p.add_argument("--out", required=True, help="study directory; rerun the same command to reuse finished stages")
    try:
        args = p.parse_args(argv)
        run_command(from_args(QuickstartCommand, args), args.out)
    except UsageError as e:
        print(f"icl_metarl.study.quickstart: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
