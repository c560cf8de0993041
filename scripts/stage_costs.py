"""Stage by stage, what a study of ``scripts/reproduce_ml10_test.sh`` cost, read from its files; and what the
recipe would cost at full size on a suite, projected from those measured rates.

    python scripts/stage_costs.py studies/ml10-test-s0                  # ML10, one training seed, as measured
    python scripts/stage_costs.py studies/ml45-cost --project ML45       # a small ML45 run, scaled to the recipe

Every agent's budget.json is cumulative (it counts the data and the training it stands on), so a stage's cost
is its budget minus the budget of the stage it started from. ``--project SUITE`` scales each stage by the
recipe's full size on that suite over the size measured (per train environment: 100 trials, 40 relabelled
trials a round, 150 pretraining steps, 100 steps a stage of two rounds, 52 maml-imitate iterations of 10 tasks
x 2 episodes), taking CPU per trial, per optimizer step and per env step as constant; start-up costs (task
lists, imports) are paid once, so a small run's projection is an overestimate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icl_metarl.harness.budget import Budget, read_budget
from icl_metarl.harness.files import read_json
from icl_metarl.harness.suites import get_suite
from icl_metarl.incontext.train import data_budget

# Per train environment, the recipe's full size (scripts/reproduce_ml10_test.sh)
PER_ENV = {"trials": 100, "relabelled": 2 * 40, "pretrain steps": 150, "stage steps": 100,
           "maml env steps": 52 * 10 * 2 * 500}


def _budget(path: Path) -> Budget:
    b = read_budget(path)
    if b is None:
        sys.exit(f"{path}: no budget.json (not a finished stage of scripts/reproduce_ml10_test.sh)")
    return Budget.from_json(b)


def _relabelled_trials(stage: Path) -> int:
    return sum(int(read_json(m)["settings"]["trials"]) for m in sorted(stage.glob("round-*/relabelled/manifest.json")))


def stages(study: Path) -> list[tuple[str, float, int, str]]:
    """(stage, CPU minutes, units done, unit) for every stage the study holds, in order."""
    manifest = study / "histories" / "manifest.json"
    if not manifest.exists():
        sys.exit(f"{study}: no histories/manifest.json; give a study directory of scripts/reproduce_ml10_test.sh")
    m = read_json(manifest)
    gen = data_budget([m], "expert")
    rows = [("histories (expert, generate)", gen.data_cpu_minutes or 0.0, int(m["settings"]["trials"]), "trials")]
    before = _budget(study / "pretrain-norm")
    rows.append(("pretraining", before.train_cpu_minutes, before.optimizer_steps, "pretrain steps"))
    for name, label in (("icl", "rounds 1-2"), ("icl4", "rounds 3-4")):
        if not (study / name / "budget.json").exists():
            continue
        now = _budget(study / name)
        rows.append((f"{label}: the agent's trials, expert-labelled", (now.data_cpu_minutes or 0.0) -
                     (before.data_cpu_minutes or 0.0), _relabelled_trials(study / name), "relabelled"))
        rows.append((f"{label}: training", now.train_cpu_minutes - before.train_cpu_minutes,
                     now.optimizer_steps - before.optimizer_steps, "stage steps"))
        before = now
    if (study / "maml-imitate" / "budget.json").exists():
        mi = _budget(study / "maml-imitate")
        rows.append(("maml-imitate (gradient learner)", mi.train_cpu_minutes, mi.env_steps, "maml env steps"))
    return rows


def project(rows: list[tuple[str, float, int, str]], envs: int) -> list[tuple[int, float]]:
    """Per stage: the recipe's full size on a suite of ``envs`` train environments, and the CPU minutes it
    would take at the rate measured (CPU per unit constant)."""
    return [(PER_ENV[unit] * envs, cpu * PER_ENV[unit] * envs / done if done else float("nan"))
            for _, cpu, done, unit in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path)
    p.add_argument("--project", metavar="SUITE", help="scale each stage to the recipe's full size on SUITE (ML10, ML45)")
    a = p.parse_args()
    rows = stages(a.study)
    full = project(rows, len(get_suite(a.project).train_envs)) if a.project else None
    print("| stage | measured | CPU-min |" + (f" {a.project} full size | projected CPU-min |" if full else ""))
    print("|---|---|---|" + ("---|---|" if full else ""))
    for i, (stage, cpu, done, unit) in enumerate(rows):
        print(f"| {stage} | {done:,} {unit} | {cpu:.1f} |" + (f" {full[i][0]:,} | {full[i][1]:.0f} |" if full else ""))
    total = sum(r[1] for r in rows)
    projected = sum(f[1] for f in full) if full else 0.0
    print(f"| **total** | | **{total:.1f}** |" + (f" | **{projected:.0f}** ({projected / 60:.1f} CPU-hours) |"
                                                   if full else ""))


if __name__ == "__main__":
    main()
