"""Settings of a whole study (the quickstart and the configs/*.json files): every stage's settings in
one dataclass, its presets, and reading and checking a configuration file.

Free of torch, so that the command line can answer ``--help`` without loading the learners. Not for:
running the stages (``quickstart.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gradient_meta.config import MetaRLConfig
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.evaluation import EvalConfig
from icl_metarl.harness.files import as_json, read_json
from icl_metarl.harness.settings import check_value, field_types, from_dict
from icl_metarl.harness.suites import (
    MEASURED_GOAL_OFFSETS,
    check_action_repeat,
    check_episode_length,
    check_playable,
    get_suite,
    parse_goal_offsets,
)
from icl_metarl.incontext.config import GenerateConfig, TrainConfig, check_generate
from icl_metarl.probes.config import ProbeConfig
from icl_metarl.study.ml1_presets import quickstart_preset

STAGES = ("generate", "pretrain", "meta-train", "evaluate", "probe", "report")
SIZES = ("tiny", "default")
#: stages that may run under `accelerate launch` with several processes (the others would run N times)
DISTRIBUTED_STAGES = ("generate", "pretrain", "meta-train", "evaluate")
#: where each stage writes, under the quickstart directory
DIRS = {"generate": "histories", "pretrain": "icl", "meta-train": "gradient", "evaluate": "eval", "probe": "probe"}
#: where the evaluate stage writes its train-split diagnostic (QuickstartConfig.train_diagnostic)
TRAIN_DIAGNOSTIC_DIR = "eval-train"
DONE_DIR = "done"


def _default_generate():
    # A fresh goal per trial: 50 benchmark goals are memorised, not searched for (docs/results.md, earlier runs).
    # The learner heads for the goal displaced by N(0, s^2), s drawn from [0, 0.15 m] for every episode: the
    # context holds places near the goal with their rewards, and a late episode's end point is no shortcut
    # to the goal (docs/results.md, issue 12: the recipe that first transferred across episodes).
    return GenerateConfig(task_pool="fresh", trials=1000, episodes_per_trial=4, noise_kind="goal",
                          noise_schedule="random", noise_max=0.15, trials_per_shard=50, workers=0)


def _default_pretrain():
    # The agent explores in episode 1 of a trial (a constant random action offset): a posterior-mean policy
    # otherwise walks the same path every episode and its context never tells it more. Two relabelling
    # rounds then train it on its own exploring trials, every step labelled with the expert's action
    # (chosen on validation tasks against one round: docs/results.md, issue 20).
    return TrainConfig(target="expert", episodes_per_window=4, batch_size=16, steps=2400, d_model=64, n_layer=3,
                       n_head=4, checkpoint_every=200, log_every=25, explore_episodes=1, explore_scale=0.25,
                       relabel_rounds=2, relabel_trials=300)


def _default_meta_train():
    return MetaRLConfig(algo="maml", iterations=40, meta_batch=10, episode_length=50, checkpoint_every=5)


def _default_evaluate():
    # 5 seeds on the 50 test tasks: the context's own gain (against the wiped agent) is resolved to about
    # +-0.14; one seed left it at +-0.16 and unproven (issue 20)
    return EvalConfig(adaptation_episodes=3, evaluation_episodes=1, seeds=(0, 1, 2, 3, 4), num_tasks=50, batch_size=50)


def _default_probe():
    # all 50 test tasks: a success rate to about +-0.14, a paired change of 0.2 beyond its interval
    return ProbeConfig(trials=50)


@dataclass
class QuickstartConfig:
    """Every stage's settings; the defaults are the CPU quickstart (target: <= 20 minutes on 2 cores)."""

    name: str = "quickstart"
    """label of the study, printed in the report"""
    description: str = "the whole study, small, on a CPU"
    """one line saying what this configuration is for"""
    budget: str = "17 minutes measured on an idle 2-core CPU (19.5 CPU-min; docs/results.md, Quickstart)"
    """what a run costs (time, hardware), as measured or estimated; written into the report"""
    suite: str = "ML1:reach-v3"
    """Meta-World suite of every stage (ML1:<env>-v3, ML10, ML45)"""
    suite_seed: int = 0
    """Meta-World benchmark seed of every stage: which tasks are train and test"""
    expert_goal_offsets: tuple[str, ...] = (MEASURED_GOAL_OFFSETS["reach-v3"],)
    """ENV=x,y,z (metres): the scripted expert of environment ENV is told the goal shifted by this, in the
    histories, their relabelling, the imitation learners' labels and the oracle (suites.MEASURED_GOAL_OFFSETS
    says why reach-v3 needs one); each ENV must be an environment of the suite ([] for none: a study that
    changes the suite must say which it keeps)"""
    split: str = "test"
    """split the evaluate and probe stages play: validation while choosing a recipe, budget or checkpoint
    (with ML10-holdout / ML45-holdout: the held-out train environments), test once per final recipe"""
    train_diagnostic: int = 0
    """tasks per train environment that the evaluate stage also plays on the train split, with the same agents,
    episodes and seeds, into eval-train/: a diagnostic beside the split's figures (did the agents learn the
    environments they trained on?), never a result (0: none)"""
    seed: int = 0
    """study seed: shifts the seeds of the data, the pretraining, the meta-training, the evaluation and the
    probe together (each section's seed + this; the evaluation's seeds by this x their number, so two study
    seeds never share one); the test tasks stay the benchmark's"""
    episode_length: int = 50
    """steps per episode in every stage (histories, model context, MAML, evaluation, probes); 50 in the
    quickstart: the expert told the goal still succeeds on every task (first success near step 36), but an
    agent that does not know the goal has little time to search for it inside an episode, so what its
    earlier episodes tell it matters (issue 20); ``--suite ML1:<env>`` takes that environment's measured length
    (ml1_presets, results/expert-ml1)"""
    action_repeat: int = 1
    """decision interval k of every stage (histories, relabelling, meta-training, evaluation, baselines included,
    probes): agents act every k-th simulator step, the action held in between; episode_length stays in simulator steps"""
    stages: tuple[str, ...] = STAGES
    """stages to run, in the order of STAGES (a study may leave some out)"""
    torch_threads: int = 1
    """torch CPU threads while pretraining (0: torch's default); 1 on a shared small machine, where two
    threads thrash when another process holds a core (docs/benchmarks.md)"""
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
    "generate": ("suite", "suite_seed", "episode_length", "action_repeat", "split", "expert_goal_offsets"),
    "pretrain": ("data", "out", "resume"),
    "meta_train": ("suite", "suite_seed", "episode_length", "action_repeat", "expert_goal_offsets"),
    "evaluate": ("suite", "task_seed", "episode_length", "action_repeat", "split"),
    "probe": ("suite", "suite_seed", "episode_length", "action_repeat", "split"),
}
#: settings that change how a stage runs, not what it produces: left out of the done-marker comparison
NOT_RESULTS = ("workers", "progress", "resume", "kill_after", "trace_windows", "torch_threads", "vector")


def tiny() -> QuickstartConfig:
    """A reduced quickstart for tests and a first look (about a minute): every stage, tiny sizes."""
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
def _section(name: str, base, values):
    return from_dict(type(base), dict(values) if isinstance(values, dict) else values, name,
                     base=base, owned=OWNED[name])


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
            changes[key] = check_value(key, value, *field_types(QuickstartConfig)[key])
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


def _check_count(name: str, value, meaning: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(f"{name} must be an integer >= 0{meaning}, got {value!r}")


def check_config(cfg: QuickstartConfig) -> QuickstartConfig:
    """Reject what no stage could run, before any stage starts."""
    get_suite(cfg.suite)
    check_playable(cfg.suite, cfg.split)
    parse_goal_offsets(cfg.expert_goal_offsets, cfg.suite)
    check_episode_length(cfg.episode_length)
    check_action_repeat(cfg.action_repeat)
    for s in cfg.stages:
        if s not in STAGES:
            raise choice_error("stage", s, STAGES)
    _check_count("seed", cfg.seed)
    _check_count("train_diagnostic", cfg.train_diagnostic, " (tasks per train environment; 0: none)")
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
    if cfg.train_diagnostic:
        train_diagnostic_config(cfg).check()
    if cfg.pretrain.episodes_per_window > cfg.generate.episodes_per_trial:
        raise UsageError(f"pretrain.episodes_per_window={cfg.pretrain.episodes_per_window} exceeds the "
                         f"{cfg.generate.episodes_per_trial} episodes of a generated trial")
    return cfg


def stage_config(cfg: QuickstartConfig, stage: str, out: str | Path = "DIR"):
    """The effective config a stage runs with: its section plus the settings the quickstart owns."""
    out = Path(out)
    # pretraining reads its interval from the histories (and its relabelling rounds play at it)
    common = {"suite": cfg.suite, "episode_length": cfg.episode_length, "action_repeat": cfg.action_repeat}
    shift = cfg.seed * len(cfg.evaluate.seeds)  # evaluation seeds: disjoint blocks, one per study seed
    if stage == "generate":
        return dataclasses.replace(cfg.generate, **common, suite_seed=cfg.suite_seed, split="train",
                                   expert_goal_offsets=tuple(cfg.expert_goal_offsets),
                                   seed=cfg.generate.seed + cfg.seed)
    if stage == "pretrain":
        data = [str(out / DIRS["generate"])] + [str(d) for d in extra_data_dirs(cfg, out)]
        return dataclasses.replace(cfg.pretrain, data=data, out=str(out / DIRS["pretrain"]), resume=True,
                                   seed=cfg.pretrain.seed + cfg.seed)
    if stage == "meta-train":
        return dataclasses.replace(cfg.meta_train, **common, suite_seed=cfg.suite_seed,
                                   expert_goal_offsets=tuple(cfg.expert_goal_offsets),
                                   seed=cfg.meta_train.seed + cfg.seed)
    if stage == "evaluate":
        return dataclasses.replace(cfg.evaluate, **common, task_seed=cfg.suite_seed, split=cfg.split,
                                   seeds=tuple(s + shift for s in cfg.evaluate.seeds))
    if stage == "probe":  # shifted as the evaluation's seeds: it replays the same trials
        return dataclasses.replace(cfg.probe, **common, suite_seed=cfg.suite_seed, split=cfg.split,
                                   seed=cfg.probe.seed + shift)
    raise choice_error("stage with a config", stage, [s for s in STAGES if s != "report"])


def train_diagnostic_config(cfg: QuickstartConfig, out: str | Path = "DIR"):
    """The evaluate stage's config for its train-split diagnostic: the same protocol and seeds on
    ``cfg.train_diagnostic`` tasks of each train environment."""
    config = stage_config(cfg, "evaluate", out)
    return dataclasses.replace(config, split="train", num_tasks=None, tasks_per_env=cfg.train_diagnostic)


def extra_generate_configs(cfg: QuickstartConfig) -> list:
    """The effective configs of the generate_extra history sets (owned settings as for generate)."""
    base = stage_config(cfg, "generate")
    owned = {k: getattr(base, k) for k in OWNED["generate"]}
    return [dataclasses.replace(extra, **owned, seed=extra.seed + cfg.seed) for extra in cfg.generate_extra]


def extra_data_dirs(cfg: QuickstartConfig, out: str | Path) -> list[Path]:
    return [Path(out) / f"{DIRS['generate']}-{i + 1}" for i in range(len(cfg.generate_extra))]


def to_dict(cfg: QuickstartConfig) -> dict:
    """The configuration as JSON (what ``config_from_dict`` reads back), owned fields left out."""
    out = {k: v for k, v in asdict(cfg).items() if k not in SECTIONS and k != "generate_extra"}
    for key in SECTIONS:
        out[key] = {k: v for k, v in asdict(getattr(cfg, key)).items() if k not in OWNED[key]}
    out["generate_extra"] = [{k: v for k, v in asdict(e).items() if k not in OWNED["generate"]}
                             for e in cfg.generate_extra]
    return as_json(out)


@dataclass
class QuickstartCommand:
    """What ``icl-metarl quickstart`` is asked to run (besides ``--out``)."""

    size: str | None = None
    """preset: tiny (a minute, a smoke test) or default (the CPU quickstart)"""
    config: str | None = None
    """study configuration JSON (configs/*.json), applied on top of its 'size' preset"""
    stages: tuple[str, ...] | None = None
    """subset of generate, pretrain, meta-train, evaluate, probe, report (default: the configuration's)"""
    seed: int | None = None
    """study seed: shifts the data, training, evaluation and probe seeds together (default: the
    configuration's, 0); recorded in quickstart_config.json"""
    suite: str | None = None
    """another suite than the configuration's, e.g. ML10-holdout to choose a recipe on held-out
    environments; ML1:<env> (any of the 50) also takes that environment's episode length and expert goal
    offset from its measured expert (results/expert-ml1) (default: the configuration's)"""
    split: str | None = None
    """split the evaluate and probe stages play: validation while choosing, test once per final recipe
    (default: the configuration's)"""

    def config_for(self) -> QuickstartConfig:
        """The study configuration this command runs, checked."""
        if self.size is not None and self.size not in SIZES:
            raise choice_error("--size", self.size, SIZES)
        cfg = load_config(self.config, self.size) if self.config else preset(self.size or "default")
        if self.stages:
            cfg.stages = tuple(self.stages)
        if self.seed is not None:
            cfg.seed = self.seed
        if self.suite is not None:
            cfg.suite = self.suite
            measured = quickstart_preset(self.suite)
            if measured is not None:  # an ML1 environment: the episode length and goal its expert needs
                if measured.episode_length != cfg.episode_length:
                    cfg.budget += f" (at {cfg.episode_length} steps per episode; {measured.episode_length} here)"
                cfg.episode_length = measured.episode_length
                cfg.expert_goal_offsets = measured.expert_goal_offsets
        if self.split is not None:
            cfg.split = self.split
        return check_config(cfg)

