import gzip
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from icl_metarl.harness import evaluation
from icl_metarl.harness.agent import Agent
from icl_metarl.harness.baselines import make_baseline
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import (
    EvalAgent,
    EvalConfig,
    evaluate,
    load_agent,
    load_agents,
    load_results,
    trial_seed,
    without_timing,
)
from icl_metarl.harness.suites import expert_actions, make_trial_envs
from icl_metarl.study.cli import main

TINY = dict(suite="ML1:reach-v3", num_tasks=4, adaptation_episodes=1, evaluation_episodes=1,
            episode_length=40, seeds=(0,), progress=False)


class Spy(Agent):
    """Records everything the evaluator shows it; privileged so that it also sees the goals."""

    privileged = True

    def __init__(self, name):
        self.name = name
        self.log = []

    def start_trials(self, num_trials, seed):
        self.log.append(("start", num_trials, seed))

    def act(self, obs):
        raise AssertionError("a privileged agent is called through act_privileged")

    def act_privileged(self, obs, privileged):
        if not self.log or self.log[-1][0] != "step":
            self.log.append(("first_obs", obs.copy(), privileged.goals.copy(), list(privileged.env_names)))
        self.log.append(("step",))
        return np.zeros((len(obs), 4), dtype=np.float32)

    def end_episode(self):
        self.log.append(("end",))


class Crashes(Agent):
    name = "crashes"

    def __init__(self, after_steps):
        self.after, self.steps = after_steps, 0

    def start_trials(self, num_trials, seed):
        pass

    def act(self, obs):
        self.steps += 1
        if self.steps > self.after:
            raise RuntimeError("boom")
        return np.zeros((len(obs), 4), dtype=np.float32)


def test_oracle_succeeds_and_random_does_not_on_reach():
    cfg = EvalConfig(**{**TINY, "num_tasks": 6, "episode_length": 150})
    res = evaluate([EvalAgent("oracle", make_baseline("oracle")), EvalAgent("random", make_baseline("random"))], cfg)
    rate = {a: np.mean([r["success"] for r in res["records"] if r["agent"] == a]) for a in ("oracle", "random")}
    assert rate["oracle"] >= 0.8
    assert rate["random"] <= 0.2
    assert len(res["records"]) == 2 * 6 * 2 and not res["failures"]


def test_records_match_a_hand_written_loop():
    cfg = EvalConfig(**{**TINY, "num_tasks": 2, "episode_length": 120, "adaptation_episodes": 0})
    res = evaluate([EvalAgent("oracle", make_baseline("oracle"))], cfg)
    tasks = cfg.tasks()
    envs = make_trial_envs(tasks, 120, seed=trial_seed(0, 0))  # second way: play the expert directly
    obs, info = envs.reset()
    ret, first = np.zeros(2), [None, None]
    for t in range(120):
        obs, r, _, _, info = envs.step(expert_actions([x.env_name for x in tasks], obs, info["goal"]))
        ret += r
        for i in range(2):
            if first[i] is None and info["success"][i] >= 1:
                first[i] = t + 1
    for i, rec in enumerate(res["records"]):
        assert rec["task"] == i and rec["phase"] == "evaluation"
        assert rec["return"] == pytest.approx(ret[i])
        assert rec["steps_to_success"] == first[i]
        assert rec["success"] == (first[i] is not None)


def test_two_agents_see_the_same_tasks_and_seeds():
    spies = [Spy("a"), Spy("b")]
    cfg = EvalConfig(**{**TINY, "seeds": (0, 1), "batch_size": 3})
    res = evaluate([EvalAgent(s.name, s) for s in spies], cfg)
    a, b = spies[0].log, spies[1].log
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0]
        for u, v in zip(x[1:], y[1:]):
            np.testing.assert_array_equal(u, v)
    starts = [x for x in a if x[0] == "start"]
    assert [s[1] for s in starts] == [3, 1, 3, 1]  # two batches per seed
    goals = np.concatenate([x[2] for x in a if x[0] == "first_obs"][::2][:2])  # (4, 3): seed 0, episode 0 of each batch
    assert len({tuple(g) for g in goals}) == 4  # distinct tasks really were played
    strip = lambda agent: [{k: v for k, v in t.items() if k != "agent"} for t in res["trials"] if t["agent"] == agent]
    assert strip("a") == strip("b")
    assert strip("a")[1]["env_seeds"] == [trial_seed(0, 3)]


def test_same_command_twice_gives_identical_results(tmp_path):
    argv = ["evaluate", "random", "oracle", "--suite", "ML1:reach-v3", "--tasks", "2", "-K", "1", "-E", "1",
            "--episode-length", "30", "--seeds", "0", "1", "--no-progress", "--bootstrap", "50"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    ra, rb = load_results(tmp_path / "a"), load_results(tmp_path / "b")
    assert ra["timing"] and without_timing(ra) == without_timing(rb)
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()
    assert (tmp_path / "a" / "success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_agent_that_raises_loses_nothing(tmp_path):
    cfg = EvalConfig(**{**TINY, "adaptation_episodes": 2, "episode_length": 10})
    agents = [EvalAgent("crashes", Crashes(after_steps=15)), EvalAgent("random", make_baseline("random"))]
    evaluate(agents, cfg, tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["agents"]["crashes"]["status"] == "failed"
    assert res["agents"]["random"]["status"] == "ok"
    assert "RuntimeError: boom" in res["failures"][0]["error"]
    crashed = [r for r in res["records"] if r["agent"] == "crashes"]
    assert [r["episode"] for r in crashed] == [0] * 4  # its first episode finished before it raised
    assert len([r for r in res["records"] if r["agent"] == "random"]) == 4 * 3


@pytest.mark.parametrize("change, match", [
    ({"adaptation_episodes": -1}, "-K"), ({"evaluation_episodes": -2}, "-E"),
    ({"adaptation_episodes": 0, "evaluation_episodes": 0}, "at least 1"),
    ({"split": "val"}, "split 'val'"), ({"seeds": ()}, "seed"), ({"vector": "threads"}, "vector mode"),
    ({"suite": "ML2"}, "ML2"), ({"num_tasks": 0}, "--tasks"), ({"tasks_per_env": 0}, "--tasks-per-env"),
    ({"num_tasks": 2, "tasks_per_env": 2}, "not both"),
])
def test_bad_settings_are_one_line_errors(change, match):
    with pytest.raises(UsageError, match=match) as e:
        EvalConfig(**{**TINY, **change}).check()
    assert "\n" not in str(e.value)


def test_too_many_tasks():
    with pytest.raises(UsageError, match="--tasks 51 exceeds the 50"):
        EvalConfig(**{**TINY, "num_tasks": 51}).tasks()


@pytest.mark.slow  # builds ML10 and ML45 task lists (~18 s)
def test_tasks_per_env_takes_the_first_of_each_environment_in_split_order():
    all_tasks = EvalConfig(suite="ML10", split="test").tasks()
    picked = EvalConfig(suite="ML10", split="test", tasks_per_env=3).tasks()
    envs = sorted({t.env_name for t in all_tasks})
    assert len(envs) == 5 and len(picked) == 15
    for env in envs:
        assert [t for t in picked if t.env_name == env] == [t for t in all_tasks if t.env_name == env][:3]
    assert sorted(picked, key=all_tasks.index) == picked  # the split's order is kept
    with pytest.raises(UsageError, match="--tasks-per-env 51 exceeds the tasks of"):
        EvalConfig(suite="ML10", split="test", tasks_per_env=51).tasks()


def test_load_agent_errors(tmp_path):
    with pytest.raises(UsageError, match="'expert' is neither a baseline \\(random, oracle\\)"):
        load_agent("expert")
    with pytest.raises(UsageError, match="nor an existing checkpoint"):
        load_agent(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="no config.json"):
        load_agent(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UsageError, match="unknown model_type.*'bert'; valid: gradient_meta_rl, icl_metarl_policy"):
        load_agent(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_agent(str(tmp_path))


def test_cli_bad_input_exit_code_2(tmp_path, capsys):
    base = ["evaluate", "--suite", "ML1:reach-v3", "--out", str(tmp_path), "--no-progress"]
    assert main(base + ["random", "-E", "-1"]) == 2
    assert main(base + ["nope"]) == 2
    assert main(base + [str(tmp_path / "nodir")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("icl-metarl evaluate: error:") for line in err)


class _FakeCheckpointAgent(Agent):
    def __init__(self, path, **kwargs):
        self.name, self.path, self.kwargs = "fake", str(path), kwargs

    def start_trials(self, num_trials, seed):
        pass

    def act(self, obs):
        return np.zeros((len(obs), 4), dtype=np.float32)


def test_dispatch_by_model_type(tmp_path, monkeypatch):
    icl = types.ModuleType("icl_metarl.incontext.agent")
    icl.load_agent = lambda p, adaptive: _FakeCheckpointAgent(p, wipe=not adaptive)
    grad = types.ModuleType("gradient_meta.rl_agent")
    grad.load_agent = lambda p, adaptive: _FakeCheckpointAgent(p, adaptive=adaptive)
    monkeypatch.setitem(sys.modules, "icl_metarl.incontext.agent", icl)
    monkeypatch.setitem(sys.modules, "gradient_meta.rl_agent", grad)
    for name, model_type in (("icl", "icl_metarl_policy"), ("maml", "gradient_meta_rl")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type}))
    agents = load_agents([str(tmp_path / "icl"), "random", str(tmp_path / "maml")], non_adaptive=True)
    assert [a.label for a in agents] == ["fake", "fake [non-adaptive]", "random", "fake #2", "fake [non-adaptive] #2"]
    assert [a.agent.kwargs for a in agents if a.spec != "random"] == [
        {"wipe": False}, {"wipe": True}, {"adaptive": True}, {"adaptive": False}]
    assert [a.adaptive for a in agents] == [True, False, True, True, False]


# ------------------------------------------------------------------------------------ resuming
class KilledAt(Agent):
    """``agent``, killed in its ``n``-th batch of trials (None: never): ``exc`` raised at the end of that
    batch's first episode, as Ctrl-C or a stopped job would (not an Exception: no failure is recorded).
    Counts the batches it was asked to play; says it is ``agent`` (describe), as a rerun's agent would."""

    def __init__(self, agent, n=None, exc=KeyboardInterrupt):
        self.agent, self.n, self.exc, self.batches = agent, n, exc, 0
        self.name, self.privileged = agent.name, agent.privileged

    def start_trials(self, num_trials, seed):
        self.batches += 1
        self.agent.start_trials(num_trials, seed)

    def act(self, obs):
        return self.agent.act(obs)

    def act_privileged(self, obs, privileged):
        return self.agent.act_privileged(obs, privileged)

    def observe(self, reward, success):
        self.agent.observe(reward, success)

    def end_episode(self):
        if self.batches == self.n:
            raise self.exc
        self.agent.end_episode()

    def describe(self):
        return self.agent.describe()


RESUME = dict(TINY, num_tasks=5, batch_size=2, seeds=(0, 1), episode_length=12)  # 3 batches per seed


def _killable(random_killed_at=None, exc=KeyboardInterrupt):
    return [EvalAgent("random", KilledAt(make_baseline("random"), random_killed_at, exc)),
            EvalAgent("oracle", KilledAt(make_baseline("oracle")))]


@pytest.mark.parametrize("exc", [pytest.param(KeyboardInterrupt, marks=pytest.mark.slow), SystemExit])
def test_a_killed_evaluation_resumes_equal_to_an_uninterrupted_one(tmp_path, exc, capsys):
    whole = evaluate(_killable(), EvalConfig(**RESUME))
    with pytest.raises(exc):  # killed in random's 5th batch: seed 1, tasks 2-3
        evaluate(_killable(random_killed_at=5, exc=exc), EvalConfig(**RESUME), tmp_path)
    partial = load_results(tmp_path)
    assert [a["status"] for a in partial["agents"].values()] == ["pending", "pending"]
    assert [(t["seed"], t["tasks"]) for t in partial["trials"]] == [(0, [0, 1]), (0, [2, 3]), (0, [4]), (1, [0, 1])]
    assert partial["records"] == whole["records"][: (5 + 2) * 2]  # seed 0's 5 trials and 2 of seed 1's, as whole
    again = _killable()
    resumed = evaluate(again, EvalConfig(**RESUME), tmp_path)
    assert "resuming the evaluation in" in capsys.readouterr().out
    assert [a.agent.batches for a in again] == [2, 6]  # only what the kill left: random's seed 1, tasks 2-4
    assert without_timing(resumed) == without_timing(whole) == without_timing(load_results(tmp_path))
    assert set(resumed["timing"]["random"]) == {"0", "1"}
    finished = _killable()  # a rerun of a finished evaluation plays nothing; a progress bar changes nothing
    rerun = evaluate(finished, EvalConfig(**{**RESUME, "progress": True}), tmp_path)
    assert [a.agent.batches for a in finished] == [0, 0]
    assert without_timing(rerun) == {**without_timing(whole), "settings": {**whole["settings"], "progress": True}}


def test_a_failed_batch_is_played_again_on_resume(tmp_path):
    agents = lambda after: [EvalAgent("crashes", Crashes(after_steps=after)),  # noqa: E731
                            EvalAgent("random", make_baseline("random"))]
    cfg = EvalConfig(**{**TINY, "batch_size": 2, "episode_length": 10})
    failed = evaluate(agents(15), cfg, tmp_path)  # fails in its first batch, at the second episode
    assert failed["agents"]["crashes"]["status"] == "failed" and len(failed["trials"]) == 1 + 2
    resumed = evaluate(agents(10_000), cfg, tmp_path)  # now it does not: its seed is played whole
    assert without_timing(resumed) == without_timing(evaluate(agents(10_000), cfg))
    assert resumed["agents"]["crashes"]["status"] == "ok" and not resumed["failures"]


@pytest.mark.parametrize("change, agents, match", [
    ({"episode_length": 13}, None, "episode_length 12, not 13"),
    ({"seeds": (0, 2)}, None, "seeds \\[0, 1\\], not \\[0, 2\\]"),
    ({"batch_size": 3}, None, "batch_size 2, not 3"),
    ({}, ["random"], "agents \\['random', 'oracle'\\], not \\['random'\\]"),
    ({}, ["random", "oracle2"], "agents"),
    ({}, "offsets", "agent 'oracle': another description"),
])
def test_another_evaluation_in_the_same_out_is_refused(tmp_path, change, agents, match):
    with pytest.raises(KeyboardInterrupt):
        evaluate(_killable(random_killed_at=2), EvalConfig(**RESUME), tmp_path)
    before = (tmp_path / "results.json").read_bytes()
    if agents == "offsets":
        other = [EvalAgent("random", make_baseline("random")),
                 EvalAgent("oracle", make_baseline("oracle", ["reach-v3=0,0,0.045"]))]
    else:
        other = [EvalAgent(a, make_baseline(a.rstrip("2"))) for a in agents or ["random", "oracle"]]
    with pytest.raises(UsageError, match=f"results.json was written by another evaluation \\({match}.*\\); give "
                                         "this one another --out") as e:
        evaluate(other, EvalConfig(**{**RESUME, **change}), tmp_path)
    assert "\n" not in str(e.value)
    assert (tmp_path / "results.json").read_bytes() == before  # never mixed


def test_other_package_versions_are_another_evaluation(tmp_path, monkeypatch):
    evaluate([EvalAgent("random", make_baseline("random"))], EvalConfig(**TINY), tmp_path)
    real = evaluation.versions()
    monkeypatch.setattr(evaluation, "versions", lambda: {**real, "torch": "0.0"})
    with pytest.raises(UsageError, match="written by another evaluation \\(torch"):
        evaluate([EvalAgent("random", make_baseline("random"))], EvalConfig(**TINY), tmp_path)


def test_a_results_file_committed_gzip_compressed_reads_as_the_plain_one(tmp_path):
    """results/ keeps large evaluations as results.json.gz: a directory holding only that reads the same."""
    plain = Path(__file__).resolve().parents[1] / "results" / "ml10-mi-s0-validation"
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "results.json.gz").write_bytes(gzip.compress((plain / "results.json").read_bytes()))
    assert load_results(tmp_path / "gz") == load_results(plain)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json.gz").write_bytes(b"not gzip")
    with pytest.raises(UsageError, match="results.json.gz is not valid JSON"):
        load_results(tmp_path / "bad")


def _by_trial(res: dict, agent: str, key: str) -> np.ndarray:
    """(episodes, tasks) of one agent's records at seed 0."""
    rec = [r for r in res["records"] if r["agent"] == agent and r["seed"] == 0]
    out = np.full((max(r["episode"] for r in rec) + 1, max(r["task"] for r in rec) + 1), np.nan)
    for r in rec:
        out[r["episode"], r["task"]] = float(r[key])
    return out


@pytest.mark.parametrize("vector", ["sync", "pipelined"])
def test_replay_best_plays_the_agent_then_repeats_its_best_adaptation_episode(vector):
    """The random agent's returns differ in every episode: the replay-best variant's adaptation episodes are
    the agent's own, and each evaluation episode scores exactly what its highest-return one scored (online
    equals the offline figure ``best_return_success`` reads from records)."""
    from icl_metarl.harness.report import best_return_success

    cfg = EvalConfig(**{**TINY, "num_tasks": 4, "adaptation_episodes": 3, "evaluation_episodes": 2,
                        "episode_length": 30, "action_repeat": 3, "vector": vector, "batch_size": 4})
    agents = load_agents(["random", "oracle"], replay_best_after=3)
    assert [a.label for a in agents] == ["random", "random [replay-best]", "oracle", "oracle [replay-best]"]
    res = evaluate(agents, cfg)
    for name in ("random", "oracle"):
        ret, rep = _by_trial(res, name, "return"), _by_trial(res, f"{name} [replay-best]", "return")
        np.testing.assert_array_equal(rep[:3], ret[:3])  # the agent's own adaptation episodes
        best = ret[:3].argmax(axis=0)
        for e in (3, 4):
            np.testing.assert_allclose(rep[e], ret[best, np.arange(4)], rtol=1e-5)
        success = _by_trial(res, f"{name} [replay-best]", "success")
        np.testing.assert_array_equal(success[3], best_return_success(success[:, :, None], rep[:, :, None], 3)[:, 0])
    assert len({round(x, 3) for x in _by_trial(res, "random", "return")[:3, 0]}) == 3  # a real choice was made


def test_replay_best_needs_adaptation_and_evaluation_episodes(tmp_path, capsys):
    base = ["evaluate", "random", "--suite", "ML1:reach-v3", "--out", str(tmp_path), "--no-progress", "--replay-best"]
    assert main(base + ["-K", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--replay-best" in err[0] and "-K 0" in err[0]
