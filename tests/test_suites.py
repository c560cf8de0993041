import json
import os
import subprocess
import sys

import numpy as np
import pytest

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.suites import (
    MEASURED_GOAL_OFFSETS,
    VALIDATION_ENVS,
    TaskSpec,
    check_playable,
    expert_actions,
    get_suite,
    make_trial_envs,
    parse_goal_offsets,
    sample_new_tasks,
    suite_names,
)


def _tasks_in_new_process(suite, split, seed, cache):
    code = (
        "import json; from icl_metarl.harness.suites import get_suite; "
        f"print(json.dumps([t.to_json() for t in get_suite({suite!r}).tasks({split!r}, {seed})]))"
    )
    env = dict(os.environ, ICL_METARL_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return [TaskSpec.from_json(d) for d in json.loads(out.stdout)]


def test_same_name_split_seed_give_same_tasks_in_a_new_process(tmp_path):
    here = get_suite("ML1:reach-v3").tasks("test", 3)
    # Built from scratch (empty cache) in another process, and again read back from that cache.
    fresh = _tasks_in_new_process("ML1:reach-v3", "test", 3, tmp_path)
    cached = _tasks_in_new_process("ML1:reach-v3", "test", 3, tmp_path)
    assert here == fresh == cached
    assert len(here) == 50
    other_seed = get_suite("ML1:reach-v3").tasks("test", 4)
    assert other_seed != here


def test_ml1_train_and_test_goals_are_disjoint():
    s = get_suite("ML1:reach-v3")
    train = {t.rand_vec for t in s.tasks("train", 0)}
    test = {t.rand_vec for t in s.tasks("test", 0)}
    assert len(train) == 50 and len(test) == 50
    assert not train & test


@pytest.mark.parametrize("name", ["ML10", "ML45"])
def test_ml10_ml45_test_environments_are_not_trained_on(name):
    s = get_suite(name)
    assert len(s.test_envs) == 5
    assert len(s.train_envs) == {"ML10": 10, "ML45": 45}[name]
    assert not set(s.train_envs) & set(s.test_envs)


@pytest.mark.parametrize("env", ["reach-v3", "push-v3"])
def test_goal_hidden_and_expert_with_true_goal_solves_test_tasks(env):
    tasks = get_suite(f"ML1:{env}").tasks("test", 0)[:5]
    envs = make_trial_envs(tasks, episode_length=500, seed=0)
    obs, info = envs.reset()
    success = np.zeros(len(tasks))
    for _ in range(500):
        assert np.all(obs[:, -3:] == 0)
        obs, _, _, truncated, info = envs.step(expert_actions([t.env_name for t in tasks], obs, info["goal"]))
        success = np.maximum(success, info["success"])
    assert truncated.all()
    assert success.mean() >= 0.8
    envs.close()


def test_trial_keeps_its_task_across_episodes_and_sync_equals_async():
    tasks = get_suite("ML1:push-v3").tasks("test", 0)[:2]
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1, 1, (2, 20, 2, 4)).astype(np.float32)  # (episode, step, trial, act)
    runs = {}
    for mode in ("sync", "async"):
        envs = make_trial_envs(tasks, episode_length=20, seed=0, mode=mode)
        trace = []
        for ep in range(2):
            obs, info = envs.reset()
            trace.append((obs.copy(), info["goal"].copy()))
            for t in range(20):
                obs, r, _, trunc, info = envs.step(acts[ep, t])
                trace.append((obs.copy(), r.copy()))
            assert trunc.all()
        envs.close()
        runs[mode] = trace
    # Same task in both episodes: the first observation and the goal repeat.
    first, second = runs["sync"][0], runs["sync"][21]
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1][0], first[1][1])  # two trials, two goals
    for (a, b), (c, d) in zip(runs["sync"], runs["async"]):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_new_tasks_never_equal_test_tasks_and_are_distinct():
    s = get_suite("ML1:reach-v3")
    test = s.tasks("test", 0)
    new = sample_new_tasks(s.train_envs, 40, seed=1, exclude=test)
    assert len({t.rand_vec for t in new}) == 40
    assert not {t.rand_vec for t in new} & {t.rand_vec for t in test}
    assert new == sample_new_tasks(s.train_envs, 40, seed=1, exclude=test)
    # Excluding the first draw forces different tasks.
    again = sample_new_tasks(s.train_envs, 5, seed=1, exclude=new[:5])
    assert not set(again) & set(new[:5])


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: get_suite("ML11"), "ML11"),
        (lambda: get_suite("ML1:reach-v2"), "reach-v2"),
        (lambda: get_suite("ML1:reach-v3").tasks("val"), "'val'"),
        (lambda: make_trial_envs(get_suite("ML1:reach-v3").tasks("test")[:1], episode_length=0), "got 0"),
        (lambda: make_trial_envs(get_suite("ML1:reach-v3").tasks("test")[:1], mode="threads"), "threads"),
    ],
)
def test_bad_input_names_the_value(call, fragment):
    with pytest.raises(UsageError, match=fragment):
        call()


def test_suite_names_cover_all_environments():
    names = suite_names()
    assert "ML10" in names and "ML45" in names and "ML1:reach-v3" in names
    assert len(names) == 54 and "ML10-holdout" in names and "ML45-holdout" in names


def test_reach_expert_parks_the_tcp_on_the_goal_not_the_hand():
    # Success is measured at the TCP, 4.5 cm below the hand that Meta-World's reach policy steers: told
    # the raw goal it would stop with the TCP 4.55 cm away (a 4.5 mm margin to the 5 cm radius).
    tasks = get_suite("ML1:reach-v3").tasks("test", 0)[:5]
    envs = make_trial_envs(tasks, episode_length=100, seed=0)
    obs, info = envs.reset()
    offsets = parse_goal_offsets([MEASURED_GOAL_OFFSETS["reach-v3"]], "ML1:reach-v3")
    for _ in range(100):
        obs, _, _, _, info = envs.step(expert_actions([t.env_name for t in tasks], obs, info["goal"], offsets))
    tcp = np.array([e._env.unwrapped.tcp_center for e in envs.envs])
    assert np.linalg.norm(tcp - info["goal"], axis=1).max() < 0.015
    assert np.abs(obs[:, :3] - tcp - (0.0, 0.0, 0.045)).max() < 0.006  # the offset the expert is told
    envs.close()


def test_validation_split_new_tasks_of_the_train_environments():
    suite = get_suite("ML1:reach-v3")
    val = suite.tasks("validation")
    train, test = suite.tasks("train"), suite.tasks("test")
    assert len(val) == len(train) == 50 and len(set(val)) == 50
    assert not set(val) & (set(train) | set(test))  # neither a train nor a test task
    assert {t.env_name for t in val} == set(suite.envs("validation")) == set(suite.train_envs)
    assert val == get_suite("ML1:reach-v3").tasks("validation")  # the same every time
    assert val != suite.tasks("validation", seed=1)  # another benchmark seed, other tasks
    with pytest.raises(UsageError, match="'valid'.*train, validation, test"):
        suite.tasks("valid")


@pytest.mark.parametrize("name", ["ML10", "ML45"])
def test_holdout_suites_validation_environments_are_never_trained_on(name):
    full, held = get_suite(name), get_suite(f"{name.lower()}-HOLDOUT")  # any case
    assert held.name == f"{name}-holdout" and held.validation_envs == VALIDATION_ENVS[name]
    assert set(held.validation_envs) <= set(full.train_envs)
    assert not set(held.validation_envs) & set(held.train_envs)
    assert set(held.train_envs) | set(held.validation_envs) == set(full.train_envs)
    assert held.envs("test") == full.test_envs and held.envs("validation") == held.validation_envs
    if name == "ML10":  # ML45's 2,250 new validation tasks take ~20 s to draw: ML10 shows the rest
        val, train = held.tasks("validation"), held.tasks("train")
        assert {t.env_name for t in val} == set(held.validation_envs) and len(val) == 50 * len(held.validation_envs)
        assert {t.env_name for t in train} == set(held.train_envs)
        assert train == [t for t in full.tasks("train") if t.env_name in held.train_envs]
        assert not set(val) & (set(full.tasks("train")) | set(full.tasks("test")))


def test_holdout_suites_test_split_is_refused_with_one_line():
    check_playable("ML10-holdout", "validation")
    check_playable("ML10", "test")
    with pytest.raises(UsageError, match="use --suite ML10 for the test split") as e:
        check_playable("ML10-holdout", "test")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="'dev'.*train, validation, test"):
        check_playable("ML10-holdout", "dev")


def test_training_pools_hold_no_validation_or_test_task(monkeypatch):
    from gradient_meta.config import MetaRLConfig
    from gradient_meta.meta_rl import build_pool, draw_tasks
    from icl_metarl.harness import suites
    from icl_metarl.incontext.config import GenerateConfig
    from icl_metarl.incontext.task_pools import build_task_pool

    held = get_suite("ML10-holdout")
    gen = GenerateConfig(suite="ML10-holdout", task_pool="fresh", trials=24, episode_length=10)
    tasks, _ = build_task_pool(gen)
    meta = MetaRLConfig(suite="ML10-holdout", task_pool="fresh", meta_batch=8)
    drawn = draw_tasks(meta, build_pool(meta), 0)
    for pool in (tasks, drawn, build_pool(MetaRLConfig(suite="ML10-holdout", task_pool="benchmark"))):
        assert {t.env_name for t in pool} <= set(held.train_envs)
    # ML1: validation tasks are new tasks of the train environment, as the fresh pools are; the pools skip them.
    # Make the first task a fresh pool would draw a validation task, and see it skipped.
    cfg = GenerateConfig(suite="ML1:reach-v3", task_pool=3, trials=3, episode_length=10)
    first = build_task_pool(cfg)[0][0]
    suites._validation_tasks.cache_clear()
    monkeypatch.setattr(suites, "_validation_tasks", lambda name, seed: (first,))
    again = build_task_pool(cfg)[0]
    assert first not in again and len(again) == 3


@pytest.mark.parametrize("entries, suite, match", [
    (["reach-v3=0,0"], None, "not ENV=x,y,z"), (["reach-v3=0,0,x"], None, "not ENV=x,y,z"),
    (["reech-v3=0,0,0.045"], None, "'reech-v3'"), (["reach-v3=0,0,1", "reach-v3=0,0,2"], None, "twice"),
    (["reach-v3=0,0,0.045"], "ML1:push-v3", "reach-v3, not an environment of suite ML1:push-v3"),
    (["reach-v3=0,0,0.045"], "ML10-holdout", None), (["bin-picking-v3=0,0,0.01"], "ML10", "not an environment"),
])
def test_goal_offsets_name_environments_of_their_suite(entries, suite, match):
    if match is None:
        assert parse_goal_offsets(entries, suite) == {"reach-v3": (0.0, 0.0, 0.045)}
        return
    with pytest.raises(UsageError, match=match) as e:
        parse_goal_offsets(entries, suite)
    assert "\n" not in str(e.value)


def test_goal_offsets_move_only_the_named_environment():
    goals = np.array([[0.0, 0.7, 0.2], [0.1, 0.8, 0.05]])
    obs = np.zeros((2, 39))
    obs[:, :3] = goals  # the hand at the goal: a shift of the goal it is told changes its (unclipped) action
    plain = expert_actions(["reach-v3", "push-v3"], obs, goals)
    shifted = expert_actions(["reach-v3", "push-v3"], obs, goals, parse_goal_offsets(["reach-v3=0,0,0.045"]))
    assert not np.array_equal(plain[0], shifted[0]) and np.array_equal(plain[1], shifted[1])
