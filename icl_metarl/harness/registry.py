"""The learner registry: how the command line, the quickstart and the evaluator find learners.

A learner is one module that calls ``register(Learner(...))`` when imported; the harness never imports
a learner by name. Learner modules are found through the ``icl_metarl.learners`` entry-point group (the
built-in ones are listed in pyproject.toml) and the ``ICL_METARL_LEARNERS`` environment variable
(comma-separated module names, for a learner in a file of your own without packaging it).

A learner's training and agent-loading functions are named as ``"module:function"`` strings and imported
only when called: its settings dataclass must import nothing heavy, so that ``icl-metarl --help`` lists
every learner without importing torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from icl_metarl.harness.agent import Agent
from icl_metarl.harness.baselines import BASELINES, BaselineOptions, make_baseline
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import read_json

ENTRY_POINTS = "icl_metarl.learners"
ENV_VAR = "ICL_METARL_LEARNERS"


@dataclass(frozen=True)
class Learner:
    """What the harness knows of a learner."""

    name: str
    """command-line name, e.g. ``icl`` or ``maml``"""
    summary: str
    """one line for ``--help``"""
    config: type
    """settings dataclass of a training run (each field documented by the string under it)"""
    train: str
    """``"module:function"``, called as ``function(config, out)``; writes a checkpoint directory ``out``"""
    load_agent: str
    """``"module:function"``, called as ``function(path, adaptive=True, **options) -> Agent``;
    ``adaptive=False`` gives the learner's non-adaptive variant"""
    model_type: str
    """the ``model_type`` in the ``config.json`` of its checkpoints, by which ``load_agent`` finds it"""
    fixed: dict = field(default_factory=dict)
    """settings this learner fixes (e.g. ``{"algo": "maml"}`` when learners share a config class)"""
    agent_options: type | None = None
    """dataclass of acting options of its agents (each field None = the checkpoint's own setting)"""
    distributed: bool = False
    """its training may run under ``accelerate launch`` with several processes"""
    threads: int = 0
    """torch CPU threads its training runs with when its settings hold no ``threads`` of their own (0: torch's
    default); the command line sets them (``--threads``), the training function never does"""


_LEARNERS: dict[str, Learner] = {}
_loaded_modules: set[str] = set()


def register(learner: Learner) -> Learner:
    """Add a learner (a second registration of the same learner is a no-op, another with its name an error)."""
    old = _LEARNERS.get(learner.name)
    if old is not None and old != learner:
        raise UsageError(f"two learners are registered as {learner.name!r}: {old.train} and {learner.train}")
    _LEARNERS[learner.name] = learner
    return learner


def discover() -> dict[str, Learner]:
    """Import every learner module named by the entry points and ``ICL_METARL_LEARNERS``; all learners."""
    modules = [ep.value for ep in entry_points(group=ENTRY_POINTS)]
    modules += [m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()]
    for module in modules:
        if module in _loaded_modules:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise UsageError(f"learner module {module!r} (from {ENV_VAR} or the {ENTRY_POINTS!r} entry points) "
                             f"cannot be imported: {e}") from None
        _loaded_modules.add(module)
    return dict(_LEARNERS)


def get(name: str) -> Learner:
    learners = discover()
    if name not in learners:
        raise choice_error("learner", name, sorted(learners))
    return learners[name]


def by_model_type(model_type, where: str) -> Learner:
    """The learner whose checkpoints carry ``model_type`` (first registered wins: they share the loader)."""
    learners = discover()
    for learner in learners.values():
        if learner.model_type == model_type:
            return learner
    raise choice_error(f"model_type in {where}", model_type, sorted({l.model_type for l in learners.values()}))


def resolve(reference: str):
    """The object named by ``"module:attribute"``."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def train(name: str, config, out):
    """Train learner ``name`` with ``config`` (its fixed settings applied) into the checkpoint directory
    ``out``; returns what its training function returns (a log or a final record)."""
    learner = get(name)
    if learner.fixed:
        config = dataclasses.replace(config, **learner.fixed)
    return resolve(learner.train)(config, Path(out))


def checkpoint_learner(path: str | Path) -> Learner:
    """The learner that wrote the checkpoint directory ``path`` (read from its config.json)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"checkpoint directory {str(path)!r} has no config.json")
    meta = read_json(config_file)
    if not isinstance(meta, dict):
        raise UsageError(f"{config_file} is not a JSON object")
    return by_model_type(meta.get("model_type"), str(config_file))


def load_agent(spec: str, adaptive: bool = True, options: dict | None = None) -> Agent:
    """A baseline by name (random, oracle) or the agent of a checkpoint directory, by its learner.

    ``adaptive=False`` gives the learner's non-adaptive variant (in-context: context wiped every
    episode; gradient: no adaptation step). ``options``: acting options by name; each learner receives
    those of its own ``agent_options`` that are not None.
    """
    if spec in BASELINES:
        return make_baseline(spec, (options or {}).get("expert_goal_offsets") or ())
    path = Path(spec)
    if not path.is_dir():
        raise UsageError(
            f"agent {spec!r} is neither a baseline ({', '.join(BASELINES)}) nor an existing checkpoint directory")
    learner = checkpoint_learner(path)
    mine = {f.name for f in dataclasses.fields(learner.agent_options)} if learner.agent_options else set()
    given = {k: v for k, v in (options or {}).items() if k in mine and v is not None}
    return resolve(learner.load_agent)(path, adaptive=adaptive, **given)


def agent_option_classes() -> list[type]:
    """The distinct acting-option dataclasses of all learners (their fields become evaluate's flags)."""
    seen: list[type] = [BaselineOptions]
    for learner in discover().values():
        if learner.agent_options is not None and learner.agent_options not in seen:
            seen.append(learner.agent_options)
    return seen
