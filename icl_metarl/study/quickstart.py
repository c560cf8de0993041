"""The whole study in one command: histories, in-context pretraining, MAML, evaluation of both against the
baselines on the test split, attention probes, and one ``report.md`` linking the tables and figures.

Each stage writes ``DIR/done/<stage>.json`` when it finishes, so a rerun reuses finished stages (and
refuses one finished with other settings); generation, pretraining and meta-training resume a killed run
by themselves. Not for: the stages' own logic, which lives in their modules. Study configurations are
JSON files (``configs/``) read by ``load_config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

# The stage modules (torch, Meta-World) are imported where used, so `icl-metarl --help` stays fast.

STAGES = ("generate", "pretrain", "meta-train", "evaluate", "probe", "report")
SIZES = ("tiny", "default")
#: stages that may run under `accelerate launch` with several processes (the others would run N times)
DISTRIBUTED_STAGES = ("pretrain", "meta-train")
#: where each stage writes, under the quickstart directory
DIRS = {"generate": "histories", "pretrain": "icl", "meta-train": "gradient", "evaluate": "eval", "probe": "probe"}
DONE_DIR = "done"


def _default_generate():
    from icl_metarl.incontext.histories import GenerateConfig

    # A fresh goal per trial: 50 benchmark goals are memorised, not searched for (DESIGN.md, first probe).
    # The learner heads for the goal displaced by N(0, s^2), s drawn from [0, 0.15 m] for every episode: the
    # context holds places near the goal with their rewards, and a late episode's end point is no shortcut
    # to the goal (docs/results.md, issue 12: the recipe that first transferred across episodes).
    return GenerateConfig(task_pool="fresh", trials=1000, episodes_per_trial=4, noise_kind="goal",
                          noise_schedule="random", noise_max=0.15, trials_per_shard=50, workers=0)


def _default_pretrain():
    from icl_metarl.incontext.train import TrainConfig

    # The agent explores in episode 1 of a trial (a constant random action offset): a posterior-mean policy
    # otherwise walks the same path every episode and its context never tells it more. One relabelling
    # round then trains it on its own exploring trials, every step labelled with the expert's action.
    return TrainConfig(target="expert", episodes_per_window=4, batch_size=16, steps=2400, d_model=64, n_layer=3,
                       n_head=4, checkpoint_every=200, log_every=25, explore_episodes=1, explore_scale=0.25,
                       relabel_rounds=1, relabel_trials=400)


def _default_meta_train():
    from gradient_meta.meta_rl import MetaRLConfig

    return MetaRLConfig(algo="maml", iterations=40, meta_batch=10, episode_length=100, checkpoint_every=5)


def _default_evaluate():
    from icl_metarl.harness.evaluation import EvalConfig

    return EvalConfig(adaptation_episodes=3, evaluation_episodes=1, seeds=(0,), num_tasks=50, batch_size=50)


def _default_probe():
    from icl_metarl.probes.probe import ProbeConfig

    return ProbeConfig(trials=5)


@dataclass
class QuickstartConfig:
    """Every stage's settings; the defaults are the CPU quickstart (target: <= 20 minutes on 2 cores)."""

    name: str = "quickstart"
    """label of the study, printed in the report"""
    description: str = "the whole study, small, on a CPU"
    """one line saying what this configuration is for"""
    budget: str = "17 minutes measured on a 2-core CPU (docs/results.md)"
    """what a run costs (time, hardware), as measured or estimated; written into the report"""
    suite: str = "ML1:reach-v3"
    """Meta-World suite of every stage (ML1:<env>-v3, ML10, ML45)"""
    suite_seed: int = 0
    """Meta-World benchmark seed of every stage: which tasks are train and test"""
    episode_length: int = 100
    """steps per episode in every stage (histories, model context, MAML, evaluation, probes)"""
    stages: tuple[str, ...] = STAGES
    """stages to run, in the order of STAGES (a study may leave some out)"""
    torch_threads: int = 1
    """torch CPU threads while pretraining (0: torch's default); on a shared 2-core box one thread trained
    at 8,800 tokens/s and two at 1,180 (they thrash when another process holds a core)"""
    generate: GenerateConfig = field(default_factory=_default_generate)
    """history generation on the train split (suite, episode length, split are set from above)"""
    generate_extra: tuple = ()
    """more history sets for pretraining, each a JSON object of settings on top of the generate section
    (e.g. uniform action noise: trials that fail to move the puck, docs/results.md); written to
    histories-1, histories-2, ... and pretrained on with the first"""
    pretrain: TrainConfig = field(default_factory=_default_pretrain)
    """in-context pretraining (data, out and resume are set by the quickstart)"""
    meta_train: MetaRLConfig = field(default_factory=_default_meta_train)
    """gradient meta-RL (algo: maml, meta-sgd or reptile)"""
    evaluate: EvalConfig = field(default_factory=_default_evaluate)
    """the shared evaluator on the test split; every checkpoint also plays its non-adaptive variant"""
    probe: ProbeConfig = field(default_factory=_default_probe)
    """attention probes of the in-context policy on test tasks"""


SECTIONS = {"generate": "generate", "pretrain": "pretrain", "meta_train": "meta-train", "evaluate": "evaluate",
            "probe": "probe"}
#: fields a section may not set: the quickstart sets them, from the top level or its directory layout
OWNED = {
    "generate": ("suite", "suite_seed", "episode_length", "split"),
    "pretrain": ("data", "out", "resume"),
    "meta_train": ("suite", "suite_seed", "episode_length"),
    "evaluate": ("suite", "task_seed", "episode_length", "split"),
    "probe": ("suite", "suite_seed", "episode_length", "split"),
}
#: settings that change how a stage runs, not what it produces: left out of the done-marker comparison
NOT_RESULTS = ("workers", "progress", "resume", "kill_after", "trace_windows", "torch_threads", "vector")


def tiny() -> QuickstartConfig:
    """A reduced quickstart for tests and a first look (about a minute): every stage, tiny sizes."""
    from gradient_meta.meta_rl import MetaRLConfig
    from icl_metarl.harness.evaluation import EvalConfig
    from icl_metarl.incontext.histories import GenerateConfig
    from icl_metarl.probes.probe import ProbeConfig
    from icl_metarl.incontext.train import TrainConfig

    return QuickstartConfig(
        name="quickstart-tiny", description="every stage at a toy size (tests, smoke runs)",
        budget="about a minute on a 2-core CPU", episode_length=50,
        generate=GenerateConfig(task_pool="fresh", trials=8, episodes_per_trial=4, trials_per_shard=4, workers=1),
        pretrain=TrainConfig(episodes_per_window=4, batch_size=4, steps=10, warmup_steps=2, d_model=32, n_layer=1,
                             n_head=2, checkpoint_every=5, log_every=2, explore_episodes=1, explore_scale=0.25,
                             relabel_rounds=1, relabel_trials=4),
        meta_train=MetaRLConfig(iterations=2, meta_batch=2, episode_length=50, hidden=(16, 16), ppo_epochs=1,
                                checkpoint_every=1),
        evaluate=EvalConfig(adaptation_episodes=3, evaluation_episodes=1, seeds=(0,), num_tasks=3, batch_size=3),
        probe=ProbeConfig(trials=2),
    )


def preset(size: str) -> QuickstartConfig:
    if size == "tiny":
        return tiny()
    if size == "default":
        return QuickstartConfig()
    raise choice_error("size", size, SIZES)


# ------------------------------------------------------------------------------------ config files
def _check_value(where: str, value, default, nullable: bool = False):
    """``value`` from JSON if it has the default's type (lists become tuples); else a UsageError."""
    if value is None and nullable:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        # task pools are 'fresh', 'benchmark' or a count: a JSON number is fine there
        ok = isinstance(value, str) or (where.endswith("task_pool") and isinstance(value, int))
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, list)
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value) if ok else value
    elif default is None:
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    else:
        ok = True
    if not ok:
        raise UsageError(f"{where} must be like {default!r} ({type(default).__name__}), got {value!r}")
    return value


def _section(name: str, base, values) -> object:
    if not isinstance(values, dict):
        raise UsageError(f"section {name!r} must be a JSON object, got {values!r}")
    defaults = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    nullable = {f.name for f in dataclasses.fields(base) if "None" in str(f.type)}
    for key, value in values.items():
        if key in OWNED[name]:
            raise UsageError(f"{name}.{key} is set by the quickstart (top-level suite/suite_seed/episode_length, "
                             f"or its directory layout); remove it")
        if key not in defaults:
            raise choice_error(f"setting in section {name!r}:", key, [k for k in defaults if k not in OWNED[name]])
        values[key] = _check_value(f"{name}.{key}", value, defaults[key], key in nullable)
    try:
        return dataclasses.replace(base, **values)
    except TypeError as e:
        raise UsageError(f"section {name!r}: {e}") from None


def config_from_dict(data: dict, size: str | None = None) -> QuickstartConfig:
    """A QuickstartConfig from a JSON object: its ``size`` preset (or ``size``) with its settings on top."""
    if not isinstance(data, dict):
        raise UsageError(f"a quickstart configuration must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    base = preset(data.pop("size", size or "default"))
    top = {f.name for f in dataclasses.fields(QuickstartConfig)}
    changes = {}
    for key, value in data.items():
        if key not in top:
            raise choice_error("configuration key", key, sorted(top | {"size"}))
        if key in SECTIONS:
            changes[key] = _section(key, getattr(base, key), dict(value) if isinstance(value, dict) else value)
        elif key == "generate_extra":
            if not isinstance(value, list):
                raise UsageError(f"generate_extra must be a list of JSON objects (settings on top of the generate "
                                 f"section), got {value!r}")
            changes[key] = tuple(_section("generate", changes.get("generate", base.generate),
                                          dict(v) if isinstance(v, dict) else v) for v in value)
        else:
            changes[key] = _check_value(key, value, getattr(base, key))
    return check_config(dataclasses.replace(base, **changes))


def load_config(path: str | Path, size: str | None = None) -> QuickstartConfig:
    """Read a study configuration (configs/*.json); any problem is a one-line UsageError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"configuration file {str(path)!r} does not exist")
    data = read_json(path)
    try:
        return config_from_dict(data, size)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None


def check_config(cfg: QuickstartConfig) -> QuickstartConfig:
    """Reject what no stage could run, before any stage starts."""
    from icl_metarl.incontext.histories import check_config as check_generate
    from icl_metarl.harness.suites import check_episode_length, get_suite

    get_suite(cfg.suite)
    check_episode_length(cfg.episode_length)
    for s in cfg.stages:
        if s not in STAGES:
            raise choice_error("stage", s, STAGES)
    if not isinstance(cfg.torch_threads, int) or cfg.torch_threads < 0:
        raise UsageError(f"torch_threads must be an integer >= 0 (0: torch's default), got {cfg.torch_threads!r}")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise UsageError(f"stages must not repeat, got {list(cfg.stages)}")
    cfg.stages = tuple(s for s in STAGES if s in cfg.stages)  # always in the order they depend on each other
    check_generate(stage_config(cfg, "generate"))
    for extra in extra_generate_configs(cfg):
        check_generate(extra)
        if cfg.pretrain.episodes_per_window > extra.episodes_per_trial:
            raise UsageError(f"pretrain.episodes_per_window={cfg.pretrain.episodes_per_window} exceeds the "
                             f"{extra.episodes_per_trial} episodes of a generate_extra trial")
    stage_config(cfg, "meta-train")  # its __post_init__ validates
    stage_config(cfg, "evaluate").check()
    if cfg.pretrain.episodes_per_window > cfg.generate.episodes_per_trial:
        raise UsageError(f"pretrain.episodes_per_window={cfg.pretrain.episodes_per_window} exceeds the "
                         f"{cfg.generate.episodes_per_trial} episodes of a generated trial")
    return cfg


def stage_config(cfg: QuickstartConfig, stage: str, out: str | Path = "DIR"):
    """The effective config a stage runs with: its section plus the settings the quickstart owns."""
    out = Path(out)
    common = {"suite": cfg.suite, "episode_length": cfg.episode_length}
    if stage == "generate":
        return dataclasses.replace(cfg.generate, **common, suite_seed=cfg.suite_seed, split="train")
    if stage == "pretrain":
        data = [str(out / DIRS["generate"])] + [str(d) for d in extra_data_dirs(cfg, out)]
        return dataclasses.replace(cfg.pretrain, data=data, out=str(out / DIRS["pretrain"]), resume=True)
    if stage == "meta-train":
        return dataclasses.replace(cfg.meta_train, **common, suite_seed=cfg.suite_seed)
    if stage == "evaluate":
        return dataclasses.replace(cfg.evaluate, **common, task_seed=cfg.suite_seed, split="test")
    if stage == "probe":
        return dataclasses.replace(cfg.probe, **common, suite_seed=cfg.suite_seed, split="test")
    raise choice_error("stage with a config", stage, [s for s in STAGES if s != "report"])


def extra_generate_configs(cfg: QuickstartConfig) -> list:
    """The effective configs of the generate_extra history sets (owned settings as for generate)."""
    base = stage_config(cfg, "generate")
    owned = {k: getattr(base, k) for k in OWNED["generate"]}
    return [dataclasses.replace(extra, **owned) for extra in cfg.generate_extra]


def extra_data_dirs(cfg: QuickstartConfig, out: str | Path) -> list[Path]:
    return [Path(out) / f"{DIRS['generate']}-{i + 1}" for i in range(len(cfg.generate_extra))]


def to_dict(cfg: QuickstartConfig) -> dict:
    """The configuration as JSON (what ``config_from_dict`` reads back), owned fields left out."""
    out = {k: v for k, v in asdict(cfg).items() if k not in SECTIONS and k != "generate_extra"}
    for key in SECTIONS:
        out[key] = {k: v for k, v in asdict(getattr(cfg, key)).items() if k not in OWNED[key]}
    out["generate_extra"] = [{k: v for k, v in asdict(e).items() if k not in OWNED["generate"]}
                             for e in cfg.generate_extra]
    return json.loads(json.dumps(out))


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
    return json.loads(json.dumps(d))


def marker_path(out: str | Path, stage: str) -> Path:
    return Path(out) / DONE_DIR / f"{stage}.json"


def stage_done(out: str | Path, stage: str, settings: dict) -> bool:
    """True if ``stage`` finished in ``out`` with these settings; a finish with others is a UsageError."""
    path = marker_path(out, stage)
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())["settings"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
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
    from icl_metarl.incontext.histories import generate

    parts = []
    for config, where in zip([stage_config(cfg, "generate", out), *extra_generate_configs(cfg)],
                             [out / DIRS["generate"], *extra_data_dirs(cfg, out)]):
        manifest = generate(config, where)
        trials = manifest["settings"]["trials"]
        per_episode = np.sum([r["successful_trials_per_episode"] for r in manifest["shards"].values()], 0) / trials
        parts.append({"trials": trials, "expert_success_per_episode": [round(float(x), 3) for x in per_episode]})
    return {**parts[0], "extra": parts[1:]} if len(parts) > 1 else parts[0]


def run_pretrain(cfg: QuickstartConfig, out: Path) -> dict:
    import torch

    from icl_metarl.incontext.train import pretrain

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    record = pretrain(stage_config(cfg, "pretrain", out))
    return {"final_loss": record.get("loss"), "tokens_per_s": record.get("tokens_per_s")}


def run_meta_train(cfg: QuickstartConfig, out: Path) -> dict:
    from gradient_meta.meta_rl import meta_train

    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`: tasks split among processes
        import torch
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    log = meta_train(stage_config(cfg, "meta-train", out), out / DIRS["meta-train"], accelerator)
    last = log[-1] if log else {}
    return {"success_pre": last.get("success_pre"), "success_post": last.get("success_post")}


def run_evaluate(cfg: QuickstartConfig, out: Path) -> dict:
    from icl_metarl.harness.evaluation import evaluate, load_agents
    from icl_metarl.harness.report import write_report

    config = stage_config(cfg, "evaluate", out).check()
    agents = load_agents(agent_specs(cfg, out), non_adaptive=True)
    results = evaluate(agents, config, out / DIRS["evaluate"])
    write_report(results, out / DIRS["evaluate"])
    for f in results["failures"]:
        print(f"  agent {f['agent']} failed at seed {f['seed']}: {f['error']}", file=sys.stderr)
    return {"agents": list(results["agents"]), "failures": len(results["failures"])}


def run_probe(cfg: QuickstartConfig, out: Path) -> dict:
    from icl_metarl.probes.probe import probe

    result = probe(out / DIRS["pretrain"], config=stage_config(cfg, "probe", out), progress=lambda m: print(f"  {m}"))
    paths = result.save(out / DIRS["probe"])
    return {"files": [p.name for p in paths], "seconds": round(result.timing["total_s"], 1)}


def run_report(cfg: QuickstartConfig, out: Path) -> dict:
    path = write_quickstart_report(cfg, out)
    return {"report": str(path)}


RUNNERS = {"generate": run_generate, "pretrain": run_pretrain, "meta-train": run_meta_train,
           "evaluate": run_evaluate, "probe": run_probe, "report": run_report}


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
            phase = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
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
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(5.5 * len(logs), 3.8), squeeze=False)
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
            ax.plot(it, [r["success_post"] for r in log], label="after the inner step")
            ax.set(xlabel="meta-iteration", ylabel="success (train tasks)", title="gradient meta-training")
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out / "training.png", buf.getvalue())
    return "training.png"


def write_quickstart_report(cfg: QuickstartConfig, out: str | Path) -> Path:
    """DIR/report.md: the headline figures, with links to the evaluation, training and probe outputs."""
    from icl_metarl.harness.evaluation import load_results
    from icl_metarl.harness.report import adaptation_lines

    out = Path(out)
    lines = [f"# {cfg.name}: {cfg.suite}", "", f"{cfg.description}. Budget: {cfg.budget}.", "",
             f"Configuration: [quickstart_config.json](quickstart_config.json). Episodes of {cfg.episode_length} "
             f"steps, benchmark seed {cfg.suite_seed}.", "", "## Stages", "",
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

    results_file = out / DIRS["evaluate"] / "results.json"
    if results_file.is_file():
        results = load_results(results_file)
        lines += adaptation_lines(results)
        lines += ["## Adaptation curves", "",
                  "Every agent on the same tasks with the same seeds; oracle (told the goal) and random bound the "
                  f"plot. All tables (success definitions, returns, steps to success): [{DIRS['evaluate']}/report.md]"
                  f"({DIRS['evaluate']}/report.md).", ""]
        for name in ("success", "return", "steps_to_success"):
            if (out / DIRS["evaluate"] / f"{name}.png").is_file():
                lines.append(f"![{name}]({DIRS['evaluate']}/{name}.png)")
        lines.append("")

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
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="study directory; rerun the same command to reuse finished stages")
    p.add_argument("--size", default=None,
                   help="preset: tiny (a minute, a smoke test) or default (the CPU quickstart, ~20 min)")
    p.add_argument("--config", default=None,
                   help="study configuration JSON (configs/*.json), applied on top of its 'size' preset")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated subset of {','.join(STAGES)} (default: the configuration's)")


def config_from_args(args) -> QuickstartConfig:
    if args.size is not None and args.size not in SIZES:
        raise choice_error("--size", args.size, SIZES)
    cfg = load_config(args.config, args.size) if args.config else preset(args.size or "default")
    if args.stages:
        cfg.stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    return check_config(cfg)


def run_from_args(args) -> None:
    cfg = config_from_args(args)
    report = run_quickstart(cfg, args.out)
    if int(os.environ.get("RANK", "0")) == 0 and "report" in cfg.stages:
        print(f"wrote {report}")


def main(argv: list[str] | None = None) -> int:
    """``python -m icl_metarl.study.quickstart`` (also under ``accelerate launch`` for --stages pretrain)."""
    p = argparse.ArgumentParser(prog="icl_metarl.study.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    try:
        run_from_args(p.parse_args(argv))
    except UsageError as e:
        print(f"icl_metarl.study.quickstart: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
