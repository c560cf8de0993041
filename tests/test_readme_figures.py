"""README.md, "Results so far": every figure quoted as recomputable equals its recomputation from the committed
results directory, with the code behind ``icl-metarl compare`` (evaluations) and ``icl-metarl suites --check``
(the expert at decision intervals).

The convention: a recomputable figure is written ``0.20 [0.05, 0.40]<!-- figure: results/DIR key=value ... -->``
(the interval is optional, the figure may be bold), in a table row that names ``results/DIR`` visibly too.
Keys: ``agent=LABEL episode=N`` (success in that episode, ``episode=evaluation``: the mean over the evaluation
episodes, or ``episode=replay-best``: the success of the highest-return adaptation episode; ``variant=non-adaptive`` for the agent's
non-adaptive variant, ``minus=non-adaptive`` for the paired difference to it) on an evaluation's
results.json; ``k=K split=SPLIT env=ENV`` (the expert's success) on a ``suites --check`` directory.
Pooled over training seeds, as ``icl-metarl compare`` pools them (runs, then tasks, then seeds): several directories
joined by commas, the same agent label in each (``results/A,results/B agent=icl episode=evaluation``), and
``minus=DIR,DIR:LABEL`` for the paired difference to another learner's runs, run i with run i. Where a learner's
label differs between directories (a snapshot chosen per training seed), each directory names its own:
``agent=L1,L2`` (one per directory of the figure) and ``minus=DIR:L1,DIR:L2``.
Earlier figures whose files were not kept carry no comment and sit in a separate table.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from icl_metarl.harness.comparison import find_agent, load_evaluations, non_adaptive_variant, parse_episode, success
from icl_metarl.harness.evaluation import load_results
from icl_metarl.harness.statistics import difference_interval, mean_interval
from icl_metarl.study.expert_check import by_env, kept_up_to, steps_to_success

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[+-]?\d+\.\d+"
FIGURE = re.compile(rf"(?P<quoted>{NUMBER}(?: \[{NUMBER}, {NUMBER}\])?)\**\s*<!-- figure: (?P<spec>[^>]*?) -->")


def results_section(readme: str) -> str:
    """The text of the README's "## Results so far" section, up to the next "## " heading."""
    match = re.search(r"^## Results so far\n(.*?)(?=^## )", readme, re.S | re.M)
    assert match, "README.md has no '## Results so far' section followed by another section"
    return match.group(1)


def quoted_figures(section: str) -> list[tuple[str, str, str]]:
    """(quoted figure, spec, its table row) for every figure comment of the section."""
    return [(m["quoted"], m["spec"], line) for line in section.splitlines() for m in FIGURE.finditer(line)]


def _fmt(values, sign: bool) -> str:
    f = "{:+.2f}" if sign else "{:.2f}"
    return f.format(values[0]) if len(values) == 1 else f"{f.format(values[0])} [{f.format(values[1])}, {f.format(values[2])}]"


def recompute(spec: str, with_interval: bool, root: Path = ROOT) -> str:
    """The figure ``spec`` names, recomputed from its committed files and written as the README writes it."""
    directory, *pairs = spec.split()
    keys = dict(p.split("=", 1) for p in pairs)
    path = root / directory
    if "k" in keys:
        if not path.is_dir():
            raise FileNotFoundError(f"{directory} is not a committed results directory")  # the expert at decision interval k, as `icl-metarl suites --check` tabulates it
        records = by_env(load_results(path / f"k{keys['k']}" / keys["split"]), "oracle")[keys["env"]]
        return f"{np.mean([r['success'] for r in records]):.2f}"
    minus = keys.get("minus", "")
    a_dirs = directory.split(",")
    a_labels = keys["agent"].split(",")
    if len(a_labels) == 1:
        a_labels *= len(a_dirs)
    assert len(a_labels) == len(a_dirs), f"{spec}: agent= names {len(a_labels)} labels for {len(a_dirs)} directories"
    b_pairs = minus_runs(minus) if minus not in ("", "non-adaptive") else []
    b_dirs = [d for d, _ in b_pairs]
    for d in a_dirs + b_dirs:
        if not (root / d).is_dir():
            raise FileNotFoundError(f"{d} is not a committed results directory")
    loaded = load_evaluations([str(root / d) for d in a_dirs + b_dirs])
    runs = [find_agent(loaded, f"{root / d}:{label}") for d, label in zip(a_dirs, a_labels)]
    episode = parse_episode(keys["episode"], loaded[0][1]["settings"])
    if keys.get("variant") == "non-adaptive":
        runs = [non_adaptive_variant(loaded, run) for run in runs]
    if minus:
        b_runs = ([non_adaptive_variant(loaded, run) for run in runs] if minus == "non-adaptive"
                  else [find_agent(loaded, f"{root / d}:{label}") for d, label in b_pairs])
        ci, sign = difference_interval(success(loaded, runs, episode), success(loaded, b_runs, episode)), True
    else:
        ci, sign = mean_interval(success(loaded, runs, episode)), False
    return _fmt(ci if with_interval else ci[:1], sign)


def minus_runs(minus: str) -> list[tuple[str, str]]:
    """(directory, label) of each run ``minus=`` names: ``DIR,DIR:LABEL`` (one label for all) or ``DIR:L1,DIR:L2``."""
    items = [item.partition(":") for item in minus.split(",")]
    last = items[-1][2]
    assert last, f"minus={minus}: its last directory names no label (DIR:LABEL)"
    return [(d, label or last) for d, _, label in items]


def spec_directories(spec: str) -> list[str]:
    """Every results directory a figure's spec reads: its own (comma-joined when pooled) and minus=DIRS:LABEL's."""
    directory, *pairs = spec.split()
    minus = dict(p.split("=", 1) for p in pairs).get("minus", "non-adaptive")
    return directory.split(",") + ([d for d, _ in minus_runs(minus)] if minus != "non-adaptive" else [])


def mismatches(section: str, root: Path = ROOT) -> list[str]:
    """Every way the section's recomputable figures fail: a quoted figure that differs from its
    recomputation, a results directory that is missing or not named in the row, an uncommented figure
    in the figure column of a row that has comments."""
    problems = []
    for quoted, spec, row in quoted_figures(section):
        for directory in spec_directories(spec):
            if directory not in FIGURE.sub("", row):
                problems.append(f"{spec}: its row does not name {directory} outside the comment")
        try:
            again = recompute(spec, "[" in quoted, root)
        except FileNotFoundError as e:
            problems.append(str(e))
            continue
        if again != quoted:
            problems.append(f"{spec}: README quotes {quoted}, the committed files give {again}")
    for row in section.splitlines():
        if row.startswith("|") and "<!-- figure:" in row:
            figure_cell = row.split("|")[2]
            if re.search(NUMBER, FIGURE.sub("", figure_cell)):
                problems.append(f"a figure without its comment in a recomputable row: {figure_cell.strip()}")
    return problems


@pytest.fixture(scope="module")
def section() -> str:
    return results_section((ROOT / "README.md").read_text())


def test_every_recomputable_readme_figure_equals_its_recomputation(section):
    figures = quoted_figures(section)
    directories = {d for _, spec, _ in figures for d in spec_directories(spec)}
    assert directories == {"results/ml10-cpu-s0-norm-dagger-validation", "results/ml10-cpu-s1-norm-dagger-validation",
                           "results/ml10-mi-s0-validation", "results/ml10-msi-s0-validation", "results/ml10-cpu-s0-norm-validation", "results/ml10-cpu-s0-validation", "results/ml10-cpu-s0-validation-pilot", "results/expert-ml10-k",
                           "results/quickstart-pick-place-v3",
                           "results/ml10-cpu-s0-norm-dagger4-validation", "results/ml10-cpu-s1-norm-dagger4-validation",
                           "results/ml10-cpu-s2-norm-dagger4-validation", "results/ml10-test-s0",
                           "results/ml10-test-s0-maml-imitate", "results/ml10-test-baselines",
                           "results/ml10-test-s1", "results/ml10-test-s1-maml-imitate",
                           "results/ml10-test-s2", "results/ml10-test-s2-maml-imitate", "results/ml10-test-s0-maml",
                           "results/ml10-cpu-s0-norm-dagger-validation-k10", "results/ml10-cpu-s0-norm-dagger-validation-k10-seed1",
                           "results/ml10-cpu-s0-norm-dagger-validation-k10-step05",
                           "results/ml10-cpu-s0-norm-dagger-validation-k10-step05-seed1",
                           "results/ml10-test-s3", "results/ml10-test-s3-maml-imitate",
                           "results/ml10-test-s6", "results/ml10-test-s7", "results/ml10-test-s8",
                           "results/ml10-test-s4", "results/ml10-test-s4-maml-imitate",
                           "results/ml10-test-s5", "results/ml10-test-s5-maml-imitate",
                           "results/ml1-reach-confirm-test-s0", "results/ml1-reach-confirm-test-s1",
                           "results/ml1-reach-confirm-test-s2", "results/ml1-push-confirm-test-s0",
                           "results/ml1-push-confirm-test-s1", "results/ml1-push-confirm-test-s2"}
    assert len(figures) >= 8
    assert mismatches(section) == []


def test_one_changed_digit_is_a_mismatch(section):
    quoted, spec, row = next(f for f in quoted_figures(section) if "[" in f[0])
    changed_figure = quoted.replace(quoted[-2], str((int(quoted[-2]) + 1) % 10), 1)
    changed = section.replace(row, row.replace(quoted, changed_figure, 1), 1)
    assert changed != section
    found = mismatches(changed)
    assert len(found) == 1 and f"README quotes {changed_figure}" in found[0]


def test_a_missing_results_directory_is_a_mismatch(section, tmp_path):
    (tmp_path / "results").mkdir()  # a checkout where no results directory was committed
    found = mismatches(section, root=tmp_path)
    assert found and all("not a committed results directory" in p for p in found)
    assert len(found) == len(quoted_figures(section))


def test_an_uncommented_figure_in_a_recomputable_row_is_a_mismatch(section):
    quoted, spec, row = quoted_figures(section)[0]
    cells = row.split("|")
    cells[2] += " 0.99 "
    assert any("without its comment" in p for p in mismatches(section.replace(row, "|".join(cells), 1)))


def test_the_committed_expert_table_equals_its_evaluations():
    """results/expert-ml10-k/table.md is what `icl-metarl suites ML10 --check 10 --split train test
    --action-repeats 1 2 3 4 5 --no-random` prints from the committed evaluations under k1..k5."""
    root, ks, splits, keep, threshold = ROOT / "results/expert-ml10-k", (1, 2, 3, 4, 5), ("train", "test"), 0.95, 0.9
    rows, below, at = [], [], {}
    for k in ks:
        for split in splits:
            for env, recs in by_env(load_results(root / f"k{k}" / split), "oracle").items():
                s = float(np.mean([r["success"] for r in recs]))
                rows.append(f"| {k} | {split} | {env} | {len(recs)} | {s:.2f} | {steps_to_success(recs)} |")
                at.setdefault((split, env), {})[k] = s
                if s < threshold:
                    below.append(f"{env} ({split}, k={k}: {s:.2f})")
    relative = [f"| {split} | {env} | {' | '.join(f'{by_k[k]:.2f}' for k in ks)} | k={kept_up_to(by_k, ks, keep)} |"
                for (split, env), by_k in sorted(at.items())]
    worst = min(kept_up_to(by_k, ks, keep) for by_k in at.values())
    table = (root / "table.md").read_text().splitlines()
    assert [line for line in table if re.match(r"\| \d \|", line)] == rows
    assert f"below {threshold}: {', '.join(below)}" in table
    assert [line for line in table if re.match(r"\| (train|test) \|", line)] == relative
    assert table[-1] == f"every environment keeps >= {keep} of its k=1 success up to k={worst}"


def test_a_changed_pooled_figure_is_a_mismatch(section):
    """Pooled figures (several directories, minus another learner) are recomputed too, not skipped."""
    pooled = [f for f in quoted_figures(section) if "," in f[1].split()[0] and "minus=results/" in f[1]]
    assert pooled, "the README quotes no pooled difference to another learner"
    quoted, spec, row = pooled[0]
    changed_figure = quoted.replace(quoted[1:5], f"{float(quoted[1:5]) + 0.01:.2f}", 1)
    found = mismatches(section.replace(row, row.replace(quoted, changed_figure, 1), 1))
    assert len(found) == 1 and f"README quotes {changed_figure}" in found[0]


def test_minus_names_one_label_for_all_or_one_per_directory():
    assert minus_runs("results/a,results/b:x") == [("results/a", "x"), ("results/b", "x")]
    assert minus_runs("results/a:x,results/b:y") == [("results/a", "x"), ("results/b", "y")]
    with pytest.raises(AssertionError, match="names no label"):
        minus_runs("results/a:x,results/b")
