"""Settings of the few-shot regression study (train, evaluate, probe), free of torch so that the command
line shows them without importing a model. Not for: running anything (``train.py``, ``evaluation.py``,
``probe.py``); task families are checked where a command starts (``harness.regression_tasks``).
"""

from __future__ import annotations

from dataclasses import dataclass

from gradient_meta.config import SINUSOID_REPTILE_STEPS, check_reptile_steps
from icl_metarl.harness.errors import UsageError, choice_error

#: what ``fewshot train`` can train: the in-context regressor and gradient_meta.sinusoid's algorithms
LEARNERS = ("icl", "maml", "meta-sgd", "reptile", "pretrain")
#: config.json "model_type" of an in-context regressor
MODEL_TYPE = "icl_metarl_regressor"
#: the run directory's description of itself
RUN_FILE = "fewshot_run.json"


def _positive(owner, names) -> None:
    for name in names:
        v = getattr(owner, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")


def _positive_float(owner, names) -> None:
    for name in names:
        v = getattr(owner, name)
        if not (isinstance(v, (int, float)) and v > 0):
            raise UsageError(f"{name.replace('_', '-')} must be a number > 0, got {v!r}")


def _counts(what: str, values, minimum: int = 1) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values or min(values) < minimum:
        raise UsageError(f"{what} must be integers >= {minimum}, got {values!r}")
    return tuple(sorted(set(values)))


@dataclass
class FewShotTrainConfig:
    """One few-shot study: every learner trained on the same task family; CPU-sized defaults."""

    family: str = "maml-sine"
    """training task family: maml-sine, metasgd-sine, linear, linear-d20 (an unknown name lists them all)"""
    learners: tuple[str, ...] = LEARNERS
    """learners to train: icl (the in-context regressor), maml, meta-sgd, reptile, pretrain"""
    max_shots: int = 20
    """the most support points of a training task, for every learner: each trains on 1..max_shots (the
    in-context regressor draws K per query, a gradient learner per meta-update, whose query sets keep
    max_shots points)"""
    iterations: int = 2000
    """meta-updates of each gradient learner (the MAML and Meta-SGD papers: 70,000)"""
    meta_batch: int = 25
    """tasks per meta-update of the gradient learners"""
    inner_steps: int = 1
    """inner gradient steps of MAML and Meta-SGD in meta-training (and pretrain's fine-tuning), the count
    evaluation scores them at"""
    inner_lr: float = 0.01
    """inner step size of MAML (Meta-SGD: learned, initialised uniform in [0.005, 0.1]; pretrain: fine-tuning)"""
    meta_lr: float = 1e-3
    """Adam learning rate of MAML's, Meta-SGD's and pretrain's meta-update"""
    reptile_inner_steps: int = SINUSOID_REPTILE_STEPS
    """Reptile's k >= 2 (SGD steps per task) in meta-training, the count evaluation scores it at"""
    reptile_epsilon: float = 0.1
    """Reptile's meta step: the initialisation moves this fraction toward the mean adapted weights"""
    icl_steps: int = 2000
    """in-context regressor: optimizer steps"""
    icl_batch: int = 64
    """in-context regressor: tasks per optimizer step"""
    icl_queries: int = 16
    """in-context regressor: query points per task, each seeing a random number of support points"""
    icl_lr: float = 1e-3
    """in-context regressor: AdamW learning rate (linear warm-up over the first 5% of steps, then constant)"""
    d_model: int = 64
    """in-context regressor: width"""
    n_layer: int = 4
    """in-context regressor: Transformer blocks"""
    n_head: int = 4
    """in-context regressor: attention heads per block"""
    checkpoint_every: int = 500
    """in-context regressor: write the resumable state every this many steps (and at the end)"""
    resume: bool = False
    """continue the in-context regressor's training from its last checkpoint in --out"""
    seed: int = 0
    """seeds every learner's weights and training tasks"""
    threads: int = 1
    """torch CPU threads"""

    def __post_init__(self):
        self.learners = tuple(self.learners)
        for name in self.learners:
            if name not in LEARNERS:
                raise choice_error("learner", name, LEARNERS)
        if not self.learners:
            raise UsageError(f"--learners needs at least one of {', '.join(LEARNERS)}")
        _positive(self, ("iterations", "meta_batch", "inner_steps", "max_shots", "icl_steps", "icl_batch",
                         "icl_queries", "d_model", "n_layer", "n_head", "checkpoint_every", "threads"))
        _positive_float(self, ("inner_lr", "meta_lr", "reptile_epsilon", "icl_lr"))
        check_reptile_steps(self.reptile_inner_steps)
        if self.d_model % self.n_head:
            raise UsageError(f"n-head {self.n_head} must divide d-model {self.d_model}")


@dataclass
class FewShotEvalConfig:
    """Which test tasks and points every learner of a run is scored on."""

    family: str | None = None
    """task family of the test tasks; None: the run's training family"""
    shifted: bool = False
    """also score every shifted (out-of-distribution) family of the training family, on tasks of the same seed"""
    shots: tuple[int, ...] = (1, 2, 5, 10, 20, 40)
    """numbers of support points; every count uses the first K points of the same support pool"""
    tasks: int = 500
    """test tasks"""
    queries: int = 100
    """query points per test task"""
    seed: int = 1234
    """seed of the test tasks and points"""
    extra_steps: tuple[int, ...] = (10,)
    """more inner-step counts at test time: each a separate row per gradient learner ("maml (10 steps, trained
    with 1)"), beside its own row at the count it meta-trained with (0: no adaptation; its own count adds none)"""
    references: bool = True
    """also score the family's reference solvers (least squares and ridge, or k-NN and a Gaussian process)"""

    def __post_init__(self):
        self.shots = _counts("--shots", self.shots)
        self.extra_steps = _counts("--extra-steps", self.extra_steps, minimum=0)
        _positive(self, ("queries",))
        if not isinstance(self.tasks, int) or self.tasks < 2:
            raise UsageError(f"--tasks must be an integer >= 2 (intervals need two), got {self.tasks!r}")


@dataclass
class FewShotProbeConfig:
    """Does the in-context prediction behave like k gradient steps on the support set?"""

    family: str | None = None
    """task family of the probed tasks; None: the run's training family"""
    shots: tuple[int, ...] = (2, 5, 10, 20)
    """numbers of support points probed"""
    tasks: int = 100
    """probed tasks"""
    queries: int = 20
    """query points per task"""
    seed: int = 4321
    """seed of the probed tasks and points"""
    gd_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """gradient steps k of the reference learner on the support set"""
    step_sizes: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    """step sizes tried for the reference (relative to its own for a gradient checkpoint); per k the best
    match to the in-context predictions is kept"""
    reference: str = "auto"
    """the gradient learner compared with: linear (a linear model in x from w = 0, von Oswald et al. 2023),
    or a gradient learner of the run (maml, meta-sgd, reptile, pretrain: its initialisation); auto: linear
    for linear families, else the run's maml (or pretrain)"""

    def __post_init__(self):
        self.shots = _counts("--shots", self.shots)
        self.gd_steps = _counts("--gd-steps", self.gd_steps)
        self.step_sizes = tuple(float(s) for s in self.step_sizes)
        if not self.step_sizes or min(self.step_sizes) <= 0:
            raise UsageError(f"--step-sizes must be numbers > 0, got {self.step_sizes!r}")
        _positive(self, ("tasks", "queries"))
        references = ("auto", "linear", *LEARNERS[1:])
        if self.reference not in references:
            raise choice_error("reference", self.reference, references)
