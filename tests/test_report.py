import copy

import numpy as np
import pytest
from scipy import stats

from icl_metarl.harness.report import (
    _fmt,
    _View,
    adaptation_summary,
    best_return_success,
    decision_intervals,
    episode_array,
    exploration_lines,
    keep_figures,
    report_markdown,
    success_definitions,
    success_within,
    write_report,
)


def test_success_within_k_matches_a_loop():
    rng = np.random.default_rng(3)
    s = rng.binomial(1, 0.2, size=(6, 5, 2)).astype(float)
    for k in (1, 3, 6):
        want = np.array([[float(any(s[e, t, j] for e in range(k))) for j in range(2)] for t in range(5)])
        np.testing.assert_array_equal(success_within(s, k), want)


def _results(split="test"):
    """A hand-made results dict: two environments, two tasks each, two seeds, K=2, E=1, L=10."""
    tasks = [{"index": i, "env_name": n, "rand_vec": [0.0]} for i, n in enumerate(["a-v3", "a-v3", "b-v3", "b-v3"])]
    records = []
    for agent, p in (("good", 1), ("bad", 0)):
        for seed in (0, 1):
            for t in range(4):
                for e in range(3):
                    ok = bool(p and e >= t % 2)  # "good" fails the first episode of odd tasks
                    records.append({"agent": agent, "seed": seed, "task": t, "env_name": tasks[t]["env_name"],
                                    "episode": e, "phase": "adaptation" if e < 2 else "evaluation",
                                    "success": ok, "return": float(e + p), "steps_to_success": 4 if ok else None})
    return {
        "format": "icl_metarl.evaluation/1",
        "settings": {"suite": "ML10", "split": split, "adaptation_episodes": 2, "evaluation_episodes": 1,
                     "episode_length": 10, "task_seed": 0},
        "diagnostic": split != "test", "tasks": tasks, "seeds": [0, 1], "versions": {"numpy": "x"},
        "agents": {"good": {"spec": "g", "adaptive": True, "status": "ok",
                            "description": {"type": "G", "task_pool": "fresh goal per trial"}},
                   "bad": {"spec": "b", "adaptive": True, "status": "failed", "description": {"type": "B"}}},
        "trials": [], "failures": [{"agent": "bad", "seed": 1, "error": "RuntimeError: boom"}],
        "records": records, "timing": {},
    }


def test_episode_array_and_censoring():
    r = _results()
    a = episode_array(r["records"], "good", "steps_to_success", 4, [0, 1], 3, episode_length=10)
    assert a.shape == (3, 4, 2)
    assert a[0, 1, 0] == 10 and a[1, 1, 0] == 4  # censored at the episode length, then solved


def test_success_definitions_on_hand_made_records():
    d = success_definitions(_View(_results(), 200), "good")
    assert d["first episode"][0] == pytest.approx(0.5)
    assert d["last adaptation episode (2)"][0] == 1.0
    assert d["evaluation episode 3, mean (Meta-World's figure)"][0] == 1.0
    assert d["within 1 attempts"][0] == pytest.approx(0.5)
    assert d["within 3 attempts"][0] == 1.0
    assert d["best episode index (max over the curve; optimistic)"][0] == 1.0


def test_report_tables(tmp_path):
    text = report_markdown(_results(), 200)
    assert "| good | ok | fresh goal per trial |" in text
    assert "| bad | failed | not stated by the agent |" in text
    assert "## Per environment" in text and "| a-v3 | 2 |" in text
    assert "Steps to first success" in text and "RuntimeError: boom" in text
    assert "Diagnostic only" not in text
    assert "Diagnostic only: train split" in report_markdown(_results("train"), 200)
    one_env = copy.deepcopy(_results())
    for t in one_env["tasks"]:
        t["env_name"] = "a-v3"
    assert "## Per environment" not in report_markdown(one_env, 200)


def test_write_report_makes_plots(tmp_path):
    path = write_report(_results(), tmp_path, 100)
    assert path.read_text().count("![") == 3
    for name in ("success.png", "return.png", "steps_to_success.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def _adapt_rows(text):
    """The 'Does each agent adapt?' table's rows, by agent cell."""
    table = text.split("## Does each agent adapt?")[1].split("## ")[0]
    return {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}


def test_iqm_beside_the_mean_equals_scipys_trimmed_mean():
    r = _results()
    rng = np.random.default_rng(1)
    tasks = [{"index": i, "env_name": "a-v3", "rand_vec": [0.0]} for i in range(9)]
    success = rng.random((3, 9, 2)) < np.linspace(0.1, 0.9, 9)[None, :, None]  # (episodes, tasks, seeds)
    r["tasks"], r["agents"] = tasks, {"good": r["agents"]["good"]}
    r["records"] = [{"agent": "good", "seed": s, "task": t, "env_name": "a-v3", "episode": e, "success": bool(x),
                     "return": 0.0, "steps_to_success": None} for (e, t, s), x in np.ndenumerate(success)]
    row = adaptation_summary(r, 200)[0]
    per_task = success[1].mean(axis=1)  # episode 2, the last adaptation one: seeds averaged within a task
    assert row["last_iqm"][0] == pytest.approx(stats.trim_mean(per_task, 0.25))
    assert row["last_iqm"][0] != pytest.approx(per_task.mean())  # a figure of its own
    assert row["last"][0] == pytest.approx(per_task.mean())
    cells = _adapt_rows(report_markdown(r, 200))
    assert cells["agent"][3] == "IQM, episode 2" and cells["good"][3] == _fmt(row["last_iqm"])
    assert cells["good"][2] == _fmt(row["last"])


def test_decision_intervals_beside_each_agent():
    assert "decision interval" not in report_markdown(_results(), 100)  # no action_repeat recorded: 1 each
    r = _results()
    for a, k in (("good", 4), ("bad", 1)):
        r["agents"][a]["action_repeat"] = k
    assert decision_intervals(r) == {"good": 4, "bad": 1}
    text = report_markdown(r, 100)
    assert "| good | ok | fresh goal per trial | G | g | acts every 4 steps |" in text
    assert "| bad | failed | not stated by the agent | B | b | acts every step |" in text
    assert "**The agents act at different decision intervals.**" in text
    rows = _adapt_rows(text)
    assert {"good (acts every 4 steps)", "bad (acts every step)"} <= set(rows)
    for a in r["agents"].values():  # one interval, not 1: said beside each agent, without 'different'
        a["action_repeat"] = 2
    text = report_markdown(r, 100)
    assert text.count("acts every 2 steps") == 4 and "different decision intervals" not in text
    for a in r["agents"].values():
        a["action_repeat"] = 1
    assert decision_intervals(r) == {} and "acts every" not in report_markdown(r, 100)


def test_the_report_says_how_each_agent_explored():
    r = _results()
    assert exploration_lines(r) == [] and "Exploration:" not in report_markdown(r, 100)  # nobody explored
    r["agents"]["good"]["description"].update(explore_episodes=10, explore_scale=0.5, explore_kind="step")
    r["agents"]["bad"]["description"].update(explore_episodes=1, explore_scale=0.25)  # older records: no kind
    line = next(x for x in report_markdown(r, 100).splitlines() if x.startswith("Exploration:"))
    assert line == ("Exploration: good explores in episodes 1-10 of each trial: a fresh perturbation of every decision "
                    "(N(0, 0.5^2), added before the squash); bad explores in episode 1 of each trial: one constant "
                    "action offset per episode (N(0, 0.25^2)).")
    r["agents"]["bad"]["description"]["explore_scale"] = 0.0  # a scale of 0 explores nowhere
    assert "bad explores" not in exploration_lines(r)[0]


def test_keep_figures_by_hand():
    """K=2, E=2; trial 0 finds in episode 2 and keeps half, trial 1 never finds, trial 2 finds in episode 1
    and loses it, trial 3 has a missing record after its only success."""
    n = np.nan
    s = np.array([[0, 0, 1, 1],   # episode 1
                  [1, 0, 0, n],   # episode 2
                  [1, 1, 0, 0],   # episode 3 (evaluation)
                  [0, 0, 0, 0]],  # episode 4 (evaluation)
                 dtype=float)[:, :, None]  # (episodes, tasks, seeds=1)
    k = keep_figures(s, 2)
    np.testing.assert_array_equal(k["found"][:, 0], [1, 0, 1, 1])
    np.testing.assert_array_equal(k["kept"][:, 0], [0.5, n, 0.0, 0.0])
    np.testing.assert_array_equal(k["not found"][:, 0], [n, 0.5, n, n])
    # trial 0: episode 2 -> 3 kept, 3 -> 4 lost; trial 1: 3 -> 4 lost; trial 2: 1 -> 2 lost; trial 3: no pair
    np.testing.assert_array_equal(k["next after a success"][:, 0], [0.5, 0.0, 0.0, n])
    assert "replay best" not in k
    # returns pick the replayed adaptation episode: trial 0 its failed episode 1 (the higher return), trial 2 a
    # tie (the first), trial 3 its episode 1 (episode 2 has no record); evaluation returns are never read
    r = np.array([[5, 1, 2, 7],
                  [4, 3, 2, n],
                  [9, 9, 9, 9],
                  [9, 9, 9, 9]], dtype=float)[:, :, None]
    np.testing.assert_array_equal(keep_figures(s, 2, r)["replay best"][:, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(best_return_success(s, np.full_like(s, n), 2)[:, 0], [n, n, n, n])


def test_report_says_whether_an_agent_keeps_what_it_finds():
    text = report_markdown(_results(), 200)
    table = text.split("## Does it keep what it finds?")[1].split("## ")[0]
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    # "good" finds a success in every trial and keeps it; "bad" never finds one
    assert rows["good"] == "| good | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] | n/a | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] |"
    assert rows["bad"] == "| bad | 0.00 [0.00, 0.00] | n/a | 0.00 [0.00, 0.00] | n/a | 0.00 [0.00, 0.00] |"
    assert rows["a-v3"] == "| a-v3 | 2 | 1.00 / 1.00 | 0.00 / - |"
    no_evaluation = copy.deepcopy(_results())
    no_evaluation["settings"].update(adaptation_episodes=3, evaluation_episodes=0)
    assert "## Does it keep" not in report_markdown(no_evaluation, 200)


def test_report_command_renders_a_committed_results_file_again(tmp_path):
    import gzip
    import json

    from icl_metarl.study.cli import main

    src = tmp_path / "eval"
    src.mkdir()
    with gzip.open(src / "results.json.gz", "wt") as f:
        json.dump(_results(), f)
    assert main(["report", str(src), "--bootstrap", "50"]) == 0
    assert (src / "report.md").read_text() == report_markdown(_results(), 50, ["success.png", "return.png",
                                                                               "steps_to_success.png"])
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert main(["report", str(src), "--bootstrap", "0"]) == 2


def test_steps_to_success_per_environment_counts_only_successful_evaluation_episodes():
    r = copy.deepcopy(_results())
    for rec in r["records"]:  # "good" succeeds in episode 3 of task 0 at step 2 (seed 0) and 6 (seed 1)
        if rec["agent"] == "good" and rec["task"] == 0 and rec["episode"] == 2:
            rec["steps_to_success"] = 2 if rec["seed"] == 0 else 6
    text = report_markdown(r, 100)
    table = text.split("Steps to first success in the evaluation episodes")[1].split("## ")[0]
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    # a-v3: tasks 0 and 1, seeds 0 and 1: steps 2, 6, 4, 4 -> median 4 of 4; "bad" never succeeds
    assert rows["a-v3"] == "| a-v3 | 4 (4) | - |"
    r["records"] = [rec for rec in r["records"] if not (rec["task"] == 1 and rec["seed"] == 1)]
    r["records"] = [rec for rec in r["records"] if not (rec["task"] == 1 and rec["seed"] == 0)]
    text = report_markdown(r, 100)
    table = text.split("Steps to first success in the evaluation episodes")[1].split("## ")[0]
    assert "| a-v3 | 4 (2) | - |" in table  # task 1 has no record: the median of 2 and 6, of 2 episodes
