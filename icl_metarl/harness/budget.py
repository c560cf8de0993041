"""What a training run cost: environment steps, expert labels, optimizer steps, CPU and wall time, seeds.

Every learner's training writes one ``budget.json`` into its checkpoint directory (beside the weights),
so the report can put the cost beside each agent's success. The counters live in the run's resumable
training state and are restored with it, so a killed and resumed run ends with the same counts as an
uninterrupted one; CPU and wall time add up over the pieces of the run. Not for: timing benchmarks.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from icl_metarl.harness.files import atomic_write_json, read_json

BUDGET = "budget.json"


@dataclass
class Budget:
    """The cost of one training run (or of a piece of it; ``add`` sums pieces)."""

    env_steps: int = 0
    """environment steps played to produce the training signal (stored data, or a sampler's episodes)"""
    expert_labels: int = 0
    """environment steps whose scripted expert's action (told the goal) was used as a training target"""
    optimizer_steps: int = 0
    """parameter updates: every optimizer.step, over all phases of the run"""
    train_cpu_minutes: float = 0.0
    """CPU time (time.process_time) of the training process(es), summed over processes and resumes"""
    data_cpu_minutes: float | None = 0.0
    """CPU time that generated stored training data outside the training loop; None: not recorded"""
    wall_minutes: float = 0.0
    """wall-clock time of the training loop (its main process), summed over resumes"""
    seeds: dict = field(default_factory=lambda: {"train": [], "data": []})
    """{'train': seeds of the training run(s), 'data': seeds of the data it trained on}"""

    @property
    def cpu_minutes(self) -> float:
        """Training plus data generation (the training part alone where the data's is not recorded)."""
        return self.train_cpu_minutes + (self.data_cpu_minutes or 0.0)

    def add(self, other: Budget) -> Budget:
        """The two pieces together: counts and times summed, seeds merged in order of appearance."""
        data_cpu = None if None in (self.data_cpu_minutes, other.data_cpu_minutes) else \
            self.data_cpu_minutes + other.data_cpu_minutes
        seeds = {k: list(dict.fromkeys([*self.seeds.get(k, []), *other.seeds.get(k, [])])) for k in ("train", "data")}
        return Budget(self.env_steps + other.env_steps, self.expert_labels + other.expert_labels,
                      self.optimizer_steps + other.optimizer_steps, self.train_cpu_minutes + other.train_cpu_minutes,
                      data_cpu, self.wall_minutes + other.wall_minutes, seeds)

    def training_loop(self) -> Budget:
        """This piece's training loop alone (optimizer steps, training CPU and wall time, training seeds),
        without its data: phases that train on shared data add up without counting the data twice."""
        return Budget(optimizer_steps=self.optimizer_steps, train_cpu_minutes=self.train_cpu_minutes,
                      wall_minutes=self.wall_minutes, seeds={"train": self.seeds["train"]})

    def to_json(self) -> dict:
        """The fields (minutes rounded to 4 decimals), plus ``cpu_minutes``: the sum of the rounded CPU fields, so
        that a budget read back and written again is the same file (summing before rounding can differ in the
        last decimal from summing the figures the file shows)."""
        out = asdict(self)
        for k in ("train_cpu_minutes", "data_cpu_minutes", "wall_minutes"):
            out[k] = None if out[k] is None else round(out[k], 4)
        out["cpu_minutes"] = round(out["train_cpu_minutes"] + (out["data_cpu_minutes"] or 0.0), 4)
        return out

    @classmethod
    def from_json(cls, d: dict) -> Budget:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def write_budget(checkpoint_dir: str | Path, budget: Budget) -> None:
    """``checkpoint_dir/budget.json``, written atomically."""
    atomic_write_json(Path(checkpoint_dir) / BUDGET, budget.to_json())


def read_budget(checkpoint_dir: str | Path) -> dict | None:
    """The budget a checkpoint recorded, or None for one written before budgets were (or not a directory)."""
    path = Path(checkpoint_dir) / BUDGET
    return read_json(path) if path.is_file() else None


def round_phase(checkpoint_dir: str | Path) -> int | None:
    """r where a directory is one phase of an in-context run with relabelling rounds (``RUN/round-r/train``),
    whose budget.json holds its own training loop only (``run_budget`` sums the phases'); None otherwise."""
    path = Path(checkpoint_dir)
    phase = re.fullmatch(r"round-(\d+)", path.parent.name)
    return int(phase.group(1)) if phase and path.name == "train" else None


def run_budget(checkpoint_dir: str | Path) -> dict | None:
    """What it cost to reach this checkpoint. Its own ``budget.json``, except for one phase of an in-context
    run with relabelling rounds (``RUN/round-r/train``): that phase recorded its data (all of the run's data
    so far) but only its own training loop, so the loops of phases 0..r are summed in. None where any of
    them has no budget (trained before budgets were recorded)."""
    path = Path(checkpoint_dir)
    own = read_budget(path)
    phase = round_phase(path)
    if own is None or phase is None:
        return own
    earlier = [read_budget(path.parent.parent / f"round-{r}" / "train") for r in range(phase)]
    if None in earlier:
        return None
    loops = Budget()
    for b in [*earlier, own]:  # phases in training order, this one (already read) last
        loops = loops.add(Budget.from_json(b).training_loop())
    return replace(Budget.from_json(own), optimizer_steps=loops.optimizer_steps,
                   train_cpu_minutes=loops.train_cpu_minutes, wall_minutes=loops.wall_minutes).to_json()
