import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.suites import expert_actions, get_suite
from icl_metarl.incontext.histories import GenerateConfig, _check_same_settings, generate
from icl_metarl.incontext.noise import noise_levels, perturb, trial_noise_levels
from icl_metarl.incontext.shards import load_histories
from icl_metarl.incontext.task_pools import _interleave_envs, build_task_pool, environment_counts

# 6 shards of one trial, 3 episodes of 50 steps: big enough to kill between shards, small enough to be quick.
SMALL = GenerateConfig(suite="ML1:reach-v3", trials=6, episodes_per_trial=3, episode_length=50,
                       trials_per_shard=1, workers=1)


def cli_args(cfg: GenerateConfig, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "icl_metarl.study.cli", "generate", "--out", str(out), "--suite", cfg.suite,
            "--trials", str(cfg.trials), "--episodes", str(cfg.episodes_per_trial),
            "--episode-length", str(cfg.episode_length), "--trials-per-shard", str(cfg.trials_per_shard),
            "--workers", str(workers)]


def all_bytes(path: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest without the shards' measured ``cpu_seconds`` (a timing, not data)."""
    out = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    manifest = json.loads(out["manifest.json"])
    assert all(r.pop("cpu_seconds") >= 0 for r in manifest["shards"].values())
    out["manifest.json"] = json.dumps(manifest).encode()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "h"
    generate(SMALL, out, progress=False)
    return out


# ---------------------------------------------------------------------------------------- maths
def test_noise_levels_by_hand():
    assert np.allclose(noise_levels("linear", 4, 1.0), [1, 2 / 3, 1 / 3, 0])
    assert np.allclose(noise_levels("linear", 3, 0.5), [0.5, 0.25, 0])
    assert np.allclose(noise_levels("cosine", 3, 1.0), [1, 0.5, 0])
    assert np.allclose(noise_levels("none", 3, 1.0), 0)
    with pytest.raises(UsageError, match="'exp'"):
        noise_levels("exp", 3, 1.0)


def test_perturb_uniform_and_gaussian():
    expert = np.random.default_rng(0).uniform(-1, 1, (20000, 4)).astype(np.float32)
    rng = lambda: np.random.default_rng(1)  # noqa: E731
    assert np.array_equal(perturb(expert, "uniform", 0.0, rng()), expert)
    assert np.array_equal(perturb(expert, "gaussian", 0.0, rng()), expert)
    full = perturb(expert, "uniform", 1.0, rng())
    assert not np.any(np.all(full == expert, axis=1)) and np.abs(full).max() <= 1.0
    half = perturb(expert, "uniform", 0.3, rng())
    replaced = np.mean(np.any(half != expert, axis=1))
    assert 0.28 < replaced < 0.32  # 20,000 Bernoulli(0.3): standard error 0.003
    # Same randoms at any level: rows kept at level 0.3 are also kept at 0.2 (monotone replacement).
    lower = perturb(expert, "uniform", 0.2, rng())
    assert np.all(np.any(half != expert, axis=1) >= np.any(lower != expert, axis=1))
    g = perturb(expert, "gaussian", 0.5, rng())
    noise = np.random.default_rng(1).standard_normal(expert.shape) * 0.5
    assert np.allclose(g, np.clip(expert + noise, -1, 1), atol=1e-6)


def test_random_schedule_draws_a_level_per_trial_and_episode():
    levels = trial_noise_levels("random", 2000, 4, 0.15, np.random.default_rng(0))
    assert levels.shape == (2000, 4) and levels.min() >= 0.0 and levels.max() <= 0.15
    # Independent of the episode index: every episode's mean is the uniform's 0.075 (s.e. 0.001).
    assert np.allclose(levels.mean(0), 0.075, atol=0.005)
    # ... and drawn anew for every episode of a trial, not once per trial (2,000 pairs: s.e. of r 0.022).
    assert abs(np.corrcoef(levels[:, 0], levels[:, 1])[0, 1]) < 0.1 and np.all(np.ptp(levels, axis=1) > 0)
    assert np.array_equal(trial_noise_levels("linear", 3, 4, 1.0, np.random.default_rng(0)),
                          np.tile(noise_levels("linear", 4, 1.0), (3, 1)))
    # One level per row: rows at level 0 keep the expert's action, rows at level 1 lose it.
    expert = np.random.default_rng(0).uniform(-1, 1, (6, 4)).astype(np.float32)
    row_levels = np.array([0, 1, 0, 1, 0, 1.0])
    for kind in ("uniform", "gaussian"):
        taken = perturb(expert, kind, row_levels, np.random.default_rng(2))
        kept = np.all(taken == expert, axis=1)
        assert kept.tolist() == [True, False, True, False, True, False]


# ------------------------------------------------------------------------------------ generation
def test_trials_improve_and_fields_are_consistent(tmp_path):
    cfg = GenerateConfig(suite="ML1:reach-v3", trials=6, episodes_per_trial=4, episode_length=100,
                         trials_per_shard=3, workers=1)
    generate(cfg, tmp_path / "h", progress=False)
    h = load_histories(tmp_path / "h")
    K, L = 4, 100
    success = np.concatenate([np.asarray(s["successes"]).reshape(-1, K, L).max(-1) for s in h.shards])  # (T, K)
    assert success.shape == (6, K)
    assert success[:, -1].mean() > success[:, 0].mean()  # each trial shows a learner getting better
    shard = h.shards[0]
    assert np.array_equal(shard["step"][:L], np.arange(L)) and np.array_equal(shard["episode"][::L], [0, 1, 2, 3] * 3)
    assert np.all(np.asarray(shard["obs"])[:, -3:] == 0)  # goal hidden
    # Last episode has no noise: the action taken is the expert's.
    last = np.asarray(shard["episode"]) == K - 1
    assert np.array_equal(shard["actions"][last], shard["expert_actions"][last])
    # Stored expert actions agree with the expert called directly, told the task's goal (float32 obs).
    goal = np.asarray(h.tasks[int(shard["trial_task"][0])].rand_vec[-3:])
    obs = np.asarray(shard["obs"][:5], dtype=np.float64)
    again = expert_actions(["reach-v3"] * 5, obs, np.tile(goal, (5, 1)))
    assert np.allclose(again, shard["expert_actions"][:5], atol=1e-3)


def test_kill_then_rerun_equals_uninterrupted(tmp_path, reference):
    out = tmp_path / "h"
    proc = subprocess.Popen(cli_args(SMALL, out, workers=1), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    # The progress bar prints once per finished shard, after the manifest lists it: kill at the first one.
    while True:
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, "generation ended before a shard was written"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    done = len(json.loads(manifest.read_text())["shards"])
    assert 1 <= done < SMALL.trials, done
    with pytest.raises(UsageError, match="did not finish"):
        load_histories(out)
    rerun = subprocess.run(cli_args(SMALL, out, workers=2), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "steps/s" in rerun.stdout
    load_histories(out)  # validates
    assert all_bytes(out) == all_bytes(reference)


def test_other_settings_on_existing_dir_are_refused(tmp_path, reference):
    with pytest.raises(UsageError, match="episode_length=50, not 60"):
        generate(replace(SMALL, episode_length=60), reference, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a histories directory"):
        generate(SMALL, tmp_path, progress=False)


def test_a_directory_written_before_a_setting_existed_takes_its_default(tmp_path, reference):
    """Manifests from before the handover setting lack it: rerunning with the default continues them."""
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["settings"]["handover"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    generate(SMALL, old, progress=False)  # complete already: accepted, nothing replayed
    with pytest.raises(UsageError, match="handover=0, not 1"):
        _check_same_settings(old, manifest, {"settings": {**manifest["settings"], "handover": 1}})


# ----------------------------------------------------------------------------------- task pools
def test_task_pools_never_hold_test_tasks():
    test = {(t.env_name, t.rand_vec) for t in get_suite("ML1:reach-v3").tasks("test", 0)}
    train = {(t.env_name, t.rand_vec) for t in get_suite("ML1:reach-v3").tasks("train", 0)}
    for pool, distinct in (("benchmark", 50), ("7", 7), ("fresh", 20)):
        tasks, trial_tasks = build_task_pool(replace(SMALL, trials=20, task_pool=pool))
        keys = {(t.env_name, t.rand_vec) for t in tasks}
        assert len(keys) == len(tasks) == distinct
        assert not keys & test
        assert (keys <= train) == (pool == "benchmark")
        assert len(trial_tasks) == 20 and len(set(trial_tasks)) == min(distinct, 20)


@pytest.mark.slow  # ML10 generation (~18 s)
def test_trials_spread_over_environments_floor_ceil():
    """Any number of trials on ML10: per-environment trial counts differ by at most 1 (benchmark: 50 tasks
    per environment; fresh: one task per trial, round-robin; N new tasks, N a multiple of 10), every task
    is played floor or ceil(trials / tasks) times, and the counts add up to the trials and steps played."""
    for pool, trials in (("benchmark", 23), ("benchmark", 57), ("fresh", 23), ("20", 57)):
        cfg = GenerateConfig(suite="ML10", task_pool=pool, trials=trials, episodes_per_trial=2, episode_length=10)
        tasks, trial_tasks = build_task_pool(cfg)
        counts = environment_counts(cfg, tasks, trial_tasks)
        per_env = [c["trials"] for c in counts.values()]
        assert len(counts) == 10 and max(per_env) - min(per_env) <= 1, (pool, trials, per_env)
        assert sum(per_env) == trials and sum(c["steps"] for c in counts.values()) == trials * 2 * 10
        assert sum(c["tasks"] for c in counts.values()) == len(tasks)
        per_task = np.bincount(trial_tasks, minlength=len(tasks))
        assert set(per_task) <= {trials // len(tasks), -(-trials // len(tasks))}
    # One environment: the interleaving keeps the seeded permutation as it was (ML1 data unchanged).
    tasks = get_suite("ML1:reach-v3").tasks("train", 0)
    order = np.random.default_rng(0).permutation(len(tasks))
    assert np.array_equal(_interleave_envs(order, tasks), order)


def test_pool_records_in_manifest(tmp_path):
    cfg = replace(SMALL, trials=2, episode_length=5, task_pool="2", trials_per_shard=2)
    m = generate(cfg, tmp_path / "h", progress=False)
    assert m["pool"] == {"kind": "count", "distinct_tasks": 2, "disjoint_from_test_tasks": True}
    assert m["settings"]["task_pool"] == "2" and len(m["tasks"]) == 2
    assert m["environments"] == {"reach-v3": {"tasks": 2, "trials": 2, "steps": 2 * 3 * 5}}


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"task_pool": "0"}, "'0'"),
        ({"task_pool": "some"}, "'some'"),
        ({"task_pool": "100"}, "trials=6"),
        ({"split": "test", "task_pool": "fresh"}, "'fresh'"),
        ({"episodes_per_trial": 1}, "episodes_per_trial"),
        ({"noise_max": 1.5}, "1.5"),
    ],
)
def test_settings_that_cannot_be_met(tmp_path, change, fragment):
    with pytest.raises(UsageError, match=fragment) as err:
        generate(replace(SMALL, **change), tmp_path / "h", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "h").exists()


# --------------------------------------------------------------------------------------- loading
def one_line_error(path: Path, fragment: str):
    with pytest.raises(UsageError) as err:
        load_histories(path)
    msg = str(err.value)
    assert "\n" not in msg and fragment in msg, msg


def test_damaged_directories_give_one_line_errors(tmp_path, reference):
    def fresh_copy(name):
        dst = tmp_path / name
        shutil.copytree(reference, dst)
        return dst

    d = fresh_copy("truncated")
    f = d / "shards" / "00002" / "obs.npy"
    f.write_bytes(f.read_bytes()[:-100])
    one_line_error(d, str(f))

    d = fresh_copy("edited")
    f = d / "shards" / "00001" / "rewards.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    one_line_error(d, str(f))

    d = fresh_copy("missing_file")
    (d / "shards" / "00000" / "expert_actions.npy").unlink()
    one_line_error(d, str(d / "shards" / "00000" / "expert_actions.npy"))

    d = fresh_copy("no_manifest")
    (d / "manifest.json").unlink()
    one_line_error(d, str(d / "manifest.json"))

    d = fresh_copy("schema")
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    one_line_error(d, str(d / "manifest.json"))
    with pytest.raises(UsageError, match="schema version 99"):
        generate(SMALL, d, progress=False)

    load_histories(reference)  # the original is untouched and valid


def test_cli_bad_pool_is_one_line_exit_2(tmp_path):
    out = run_cli(*cli_args(SMALL, tmp_path / "h", 1)[3:], "--task-pool", "many")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "'many'" in out.stderr


def _tiny_policy(path, episode_length):
    import torch

    from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig

    torch.manual_seed(0)
    model = ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=1, n_head=2, max_episode_length=episode_length,
                                      max_context_episodes=3))
    model.save_pretrained(path)
    return path


def test_relabelled_trials_are_the_policys_states_labelled_by_the_expert(tmp_path):
    """Relabelling (issue 12): taken = the policy's own actions on the states it reached, and the
    label = the expert's action for exactly those states, checked against both called directly."""
    from icl_metarl.harness.suites import TaskSpec, make_metaworld_env
    from icl_metarl.incontext.agent import InContextAgent

    L, K = 15, 3
    policy = _tiny_policy(tmp_path / "policy", L)
    cfg = GenerateConfig(suite="ML1:reach-v3", task_pool="fresh", trials=2, episodes_per_trial=K,
                         episode_length=L, trials_per_shard=2, workers=1, policy=str(policy))
    generate(cfg, tmp_path / "relabelled", progress=False)
    h = load_histories(tmp_path / "relabelled")
    assert "policy" in h.manifest["source"] and h.manifest["settings"]["policy_sha256"]
    shard = h.shards[0]
    obs = np.asarray(shard["obs"]).reshape(2, K, L, -1)
    taken = np.asarray(shard["actions"]).reshape(2, K, L, -1)
    labels = np.asarray(shard["expert_actions"]).reshape(2, K, L, -1)
    rewards = np.asarray(shard["rewards"]).reshape(2, K, L)
    successes = np.asarray(shard["successes"]).reshape(2, K, L)
    tasks = [TaskSpec.from_json(h.manifest["tasks"][i]) for i in shard["trial_task"]]
    def true_goal(task):
        env = make_metaworld_env(task)
        env.reset()
        return env._target_pos.copy()

    goals = np.stack([true_goal(t) for t in tasks])  # (2, 3)
    # The labels are the expert's actions for the stored (policy-visited) states, told the true goal.
    for k, j in [(0, 0), (1, 7), (2, L - 1)]:
        np.testing.assert_allclose(labels[:, k, j], expert_actions([t.env_name for t in tasks], obs[:, k, j], goals),
                                   atol=1e-6)
    # The actions taken are the policy's own, fed its own context: replaying it reproduces them.
    agent = InContextAgent.from_pretrained(policy)
    agent.start_trials(2, 0)
    for k in range(K):
        for j in range(L):
            np.testing.assert_allclose(agent.act(obs[:, k, j]), taken[:, k, j], atol=1e-5)
            agent.observe(rewards[:, k, j], successes[:, k, j])
        agent.end_episode()
    assert not np.allclose(taken, labels, atol=1e-2)  # an untrained policy is no expert


def test_goal_noise_explores_wrong_goals_then_the_true_one(tmp_path):
    cfg = GenerateConfig(suite="ML1:reach-v3", task_pool="fresh", trials=2, episodes_per_trial=3, episode_length=40,
                         trials_per_shard=2, workers=1, noise_kind="goal", noise_max=0.2)
    generate(cfg, tmp_path / "goal", progress=False)
    s = load_histories(tmp_path / "goal").shards[0]
    taken = np.asarray(s["actions"]).reshape(2, 3, 40, 4)
    expert = np.asarray(s["expert_actions"]).reshape(2, 3, 40, 4)
    assert not np.allclose(taken[:, 0], expert[:, 0])  # episode 1 heads somewhere else
    np.testing.assert_array_equal(taken[:, 2], expert[:, 2])  # the last episode is the expert's


def test_relabel_settings_that_cannot_be_met(tmp_path):
    with pytest.raises(UsageError, match="no model.safetensors"):
        generate(GenerateConfig(trials=2, episodes_per_trial=2, episode_length=10, policy=str(tmp_path)),
                 tmp_path / "x", progress=False)
    from icl_metarl.incontext.train import TrainConfig, pretrain

    data = tmp_path / "d"
    generate(GenerateConfig(task_pool="4", trials=4, episodes_per_trial=2, episode_length=10, trials_per_shard=4,
                            workers=1), data, progress=False)
    with pytest.raises(UsageError, match="phases"):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), steps=2, relabel_rounds=2))
    with pytest.raises(UsageError, match="relabel_handover=1 needs relabel_rounds"):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), steps=2, relabel_handover=1))
    with pytest.raises(UsageError, match="relabel_handover=2 leaves the expert no episode of the 2"):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), steps=2, relabel_rounds=1, relabel_handover=2))
    # A pool of 4 distinct tasks cannot be relabelled with 2 trials: each task needs one.
    with pytest.raises(UsageError, match="task pool 4"):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r2"), steps=2, relabel_rounds=1, relabel_trials=2,
                             episodes_per_window=2, batch_size=2, d_model=16, n_layer=1, n_head=2, progress=False))


def test_handover_trials_are_the_policys_context_then_the_experts_labelled_episodes(tmp_path):
    """Hand-over relabelling: the policy plays the first episode (replaying it reproduces its actions),
    which carries no label (NaN); the noisy expert plays and labels the rest (noise 0: taken == label)."""
    from icl_metarl.incontext.agent import InContextAgent

    L, K = 12, 3
    policy = _tiny_policy(tmp_path / "policy", L)
    cfg = GenerateConfig(suite="ML1:reach-v3", task_pool="fresh", trials=2, episodes_per_trial=K, episode_length=L,
                         trials_per_shard=2, workers=1, policy=str(policy), handover=1, noise_kind="goal",
                         noise_schedule="none", noise_max=0.0)
    generate(cfg, tmp_path / "h", progress=False)
    h = load_histories(tmp_path / "h")
    assert "then the noisy expert" in h.manifest["source"] and h.manifest["settings"]["handover"] == 1
    shard = h.shards[0]
    obs = np.asarray(shard["obs"]).reshape(2, K, L, -1)
    taken = np.asarray(shard["actions"]).reshape(2, K, L, -1)
    labels = np.asarray(shard["expert_actions"]).reshape(2, K, L, -1)
    assert np.isnan(labels[:, 0]).all() and np.isfinite(labels[:, 1:]).all()
    np.testing.assert_array_equal(taken[:, 1:], labels[:, 1:])  # the expert, told the true goal (noise 0)
    agent = InContextAgent.from_pretrained(policy)
    agent.start_trials(2, 0)
    for j in range(L):
        np.testing.assert_allclose(agent.act(obs[:, 0, j]), taken[:, 0, j], atol=1e-5)
        agent.observe(np.asarray(shard["rewards"]).reshape(2, K, L)[:, 0, j], np.zeros(2))
    with pytest.raises(UsageError, match="needs a policy"):
        generate(GenerateConfig(trials=2, episodes_per_trial=2, episode_length=10, handover=1), tmp_path / "x",
                 progress=False)
    with pytest.raises(UsageError, match=r"handover must be an integer in \[0, episodes_per_trial=3\), got 3"):
        generate(dataclasses.replace(cfg, handover=3), tmp_path / "y", progress=False)


def test_pretrain_handover_rounds_play_the_base_datas_noisy_expert_after_the_policy(tmp_path):
    """--relabel-handover through pretrain: the round's trials use the base data's noise settings for the
    expert's episodes and leave the policy's episodes unlabelled; training on them runs (finite loss)."""
    from icl_metarl.incontext.train import TrainConfig, pretrain

    data = tmp_path / "d"
    generate(GenerateConfig(task_pool="fresh", trials=2, episodes_per_trial=2, episode_length=10, trials_per_shard=2,
                            workers=1, noise_kind="goal", noise_schedule="random", noise_max=0.1), data, progress=False)
    record = pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), steps=4, batch_size=2, d_model=16,
                                  n_layer=1, n_head=2, episodes_per_window=2, relabel_rounds=1, relabel_trials=2,
                                  relabel_handover=1, progress=False, log_every=1, checkpoint_every=0,
                                  tensorboard=False))
    assert np.isfinite(record["loss"])
    h = load_histories(tmp_path / "r" / "round-1" / "relabelled")
    settings = h.manifest["settings"]
    assert (settings["handover"], settings["noise_kind"], settings["noise_schedule"], settings["noise_max"]) == (1, "goal", "random", 0.1)
    labels = np.asarray(h.shards[0]["expert_actions"]).reshape(2, 2, 10, 4)
    assert np.isnan(labels[:, 0]).all() and np.isfinite(labels[:, 1]).all()


def test_relabel_new_tasks_draws_other_train_tasks_each_round(tmp_path):
    """--relabel-new-tasks: a round's trials are on tasks the base data does not hold (none a test task);
    without it the round replays the base data's tasks. The benchmark pool has no new tasks to draw."""
    from icl_metarl.incontext.train import TrainConfig, pretrain

    data = tmp_path / "d"
    generate(GenerateConfig(task_pool="fresh", trials=2, episodes_per_trial=2, episode_length=10, trials_per_shard=2,
                            workers=1), data, progress=False)
    base_tasks = {json.dumps(t, sort_keys=True) for t in load_histories(data).manifest["tasks"]}
    tiny = dict(steps=2, batch_size=2, d_model=16, n_layer=1, n_head=2, episodes_per_window=2, relabel_rounds=1,
                relabel_trials=2, progress=False, checkpoint_every=0, tensorboard=False)
    for new, out in ((False, "same"), (True, "new")):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / out), relabel_new_tasks=new, **tiny))
        m = load_histories(tmp_path / out / "round-1" / "relabelled").manifest
        tasks = {json.dumps(t, sort_keys=True) for t in m["tasks"]}
        assert (tasks == base_tasks) if not new else not (tasks & base_tasks)
    bench = tmp_path / "b"
    generate(GenerateConfig(task_pool="benchmark", trials=2, episodes_per_trial=2, episode_length=10,
                            trials_per_shard=2, workers=1), bench, progress=False)
    with pytest.raises(UsageError, match="relabel_new_tasks needs base data drawn from new tasks"):
        pretrain(TrainConfig(data=[str(bench)], out=str(tmp_path / "x"), relabel_new_tasks=True, **tiny))


def test_relabel_first_round_numbers_the_new_task_draws(tmp_path):
    """--relabel-first-round 3: the run's round 1 draws the tasks a run numbered from 1 would draw in its round 3
    (seed + 3000), not those of its round 1; it needs --relabel-new-tasks and must be >= 1."""
    from icl_metarl.incontext.train import TrainConfig, pretrain

    data = tmp_path / "d"
    generate(GenerateConfig(task_pool="fresh", trials=2, episodes_per_trial=2, episode_length=10, trials_per_shard=2,
                            workers=1, seed=7), data, progress=False)
    tiny = dict(steps=2, batch_size=2, d_model=16, n_layer=1, n_head=2, episodes_per_window=2, relabel_rounds=1,
                relabel_trials=2, relabel_new_tasks=True, progress=False, checkpoint_every=0, tensorboard=False)
    tasks = {}
    for first in (1, 3):
        out = tmp_path / f"first{first}"
        pretrain(TrainConfig(data=[str(data)], out=str(out), relabel_first_round=first, **tiny))
        assert json.loads((out / "training.json").read_text())["relabel_rounds"][0]["task_seed"] == 7 + 1000 * first
        m = load_histories(out / "round-1" / "relabelled").manifest
        assert m["settings"]["seed"] == 7 + 1000 * first
        tasks[first] = {json.dumps(t, sort_keys=True) for t in m["tasks"]}
    assert not (tasks[1] & tasks[3])
    for bad, new in ((0, True), (3, False)):
        with pytest.raises(UsageError, match=f"relabel_first_round={bad}"):
            pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "x"), **{**tiny, "relabel_first_round": bad,
                                                                                 "relabel_new_tasks": new}))


def test_relabel_workers_play_the_same_round(tmp_path, monkeypatch):
    """--relabel-workers 2 plays a round's trials in two processes and writes the same bytes as one process,
    so the next phase trains on the same data and ends with the same weights."""
    from icl_metarl.incontext import train as train_module
    from icl_metarl.incontext.train import TrainConfig, pretrain

    asked = []
    monkeypatch.setattr(train_module, "generate", lambda cfg, *a, **k: asked.append(cfg.workers) or generate(cfg, *a, **k))

    data = tmp_path / "d"
    generate(GenerateConfig(task_pool="fresh", trials=2, episodes_per_trial=2, episode_length=10, trials_per_shard=1,
                            workers=1), data, progress=False)
    tiny = dict(steps=2, batch_size=2, d_model=16, n_layer=1, n_head=2, episodes_per_window=2, relabel_rounds=1,
                relabel_trials=2, relabel_new_tasks=True, progress=False, checkpoint_every=0, tensorboard=False)
    for workers in (1, 2):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / f"w{workers}"), relabel_workers=workers, **tiny))
    assert asked == [1, 2]
    rounds = [tmp_path / f"w{w}" / "round-1" / "relabelled" / "shards" for w in (1, 2)]
    files = [sorted(p.relative_to(r) for p in r.rglob("*") if p.is_file()) for r in rounds]
    assert files[0] == files[1] and len({p.parts[0] for p in files[0]}) == 2
    assert all((rounds[0] / f).read_bytes() == (rounds[1] / f).read_bytes() for f in files[0])
    assert (tmp_path / "w1" / "model.safetensors").read_bytes() == (tmp_path / "w2" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="relabel_workers=0"):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "x"), relabel_workers=0, **tiny))


# ------------------------------------------------------------------------------------- processes
# 4 shards of one ML10 trial, 2 episodes of 10 steps: several environments, quick to play in two processes.
TINY_ML10 = GenerateConfig(suite="ML10", trials=4, episodes_per_trial=2, episode_length=10, trials_per_shard=1,
                           workers=1)


def launch_args(cfg: GenerateConfig, out: Path, processes: int) -> list[str]:
    """``accelerate launch`` of the generate command with ``processes`` gloo processes on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port)]
    return launch + ["-m", "icl_metarl.study.cli"] + cli_args(cfg, out, workers=0)[3:]


@pytest.fixture(scope="module")
def ml10_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ml10") / "h"
    generate(TINY_ML10, out, progress=False)
    return out


@pytest.mark.slow  # a multi-process representative of this file stays in the default suite
def test_two_processes_write_what_one_writes(tmp_path, ml10_reference):
    """Under accelerate launch each process plays its shards (index % 2) and process 0 merges their rank
    files: every shard file and the manifest (timings aside) equal a single process's."""
    run = subprocess.run(launch_args(TINY_ML10, tmp_path / "h", 2), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "in each of 2 processes" in run.stdout and run.stdout.count("steps/s") == 1  # process 0 reports
    assert not (tmp_path / "h" / "ranks").exists()
    assert all_bytes(tmp_path / "h") == all_bytes(ml10_reference)
    counts = load_histories(tmp_path / "h").manifest["environments"]
    assert sorted(c["trials"] for c in counts.values()) == [0] * 6 + [1] * 4  # 4 trials over 10 environments
    assert all(c["tasks"] == 50 and c["steps"] == c["trials"] * 2 * 10 for c in counts.values())


@pytest.mark.slow  # a multi-process representative of this file stays in the default suite
def test_killed_two_process_run_resumes_in_one_to_the_same_bytes(tmp_path, ml10_reference, capsys):
    """Killed after process 0's first shard, a 2-process ML10 run has listed its shards only in rank files;
    one process resumes it, keeping the shards whose checksums verify and replaying a damaged one."""
    out = tmp_path / "h"
    proc = subprocess.Popen(launch_args(TINY_ML10, out, 2), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            start_new_session=True)
    listed = lambda: [n for f in (out / "ranks").glob("rank-*.json")  # noqa: E731
                      for n in json.loads(f.read_text())["shards"]]
    # Process 0's progress bar prints once per finished shard, after its rank file lists it: kill at the first.
    try:
        while not (out / "ranks" / "rank-00000.json").exists():
            assert os.read(proc.stderr.fileno(), 4096), "generation ended before a shard was written"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    done = listed()
    assert 1 <= len(done) < TINY_ML10.trials and json.loads((out / "manifest.json").read_text())["shards"] == {}
    damaged = out / "shards" / done[0] / "rewards.npy"
    damaged.write_bytes(damaged.read_bytes()[:-4])
    generate(TINY_ML10, out, progress=False)
    assert f"shard {done[0]} listed in {out / 'ranks'} fails its checksums" in capsys.readouterr().err
    assert not (out / "ranks").exists()
    assert all_bytes(out) == all_bytes(ml10_reference)
    # A directory whose shards play other tasks (an older trial order) is refused, not finished.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"]["00001"]["sha256"]["trial_task"] = manifest["shards"]["00000"]["sha256"]["trial_task"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="shard 00001 plays other tasks"):
        generate(TINY_ML10, out, progress=False)


def test_action_noise_leaves_the_experts_path_and_keeps_its_labels(tmp_path):
    """DART noise: on drawer-close (whose expert ignores the goal, so goal noise alone changes nothing)
    the taken actions differ from the labels by about the noise's standard deviation; the labels are
    the expert's action at the visited state; 0 noise keeps the data's bytes and omits the setting."""
    base = GenerateConfig(suite="ML1:drawer-close-v3", task_pool="fresh", trials=2, episodes_per_trial=2,
                          episode_length=40, trials_per_shard=2, workers=1, noise_kind="goal", noise_max=0.1)
    generate(base, tmp_path / "plain", progress=False)
    generate(replace(base, action_noise=0.3), tmp_path / "dart", progress=False)
    plain, dart = load_histories(tmp_path / "plain"), load_histories(tmp_path / "dart")
    assert "action_noise" not in plain.manifest["settings"] and dart.manifest["settings"]["action_noise"] == 0.3
    p = plain.shards[0]
    np.testing.assert_array_equal(np.asarray(p["actions"]), np.asarray(p["expert_actions"]))  # goal noise: none here
    d = dart.shards[0]
    taken, label = np.asarray(d["actions"]), np.asarray(d["expert_actions"])
    unclipped = np.abs(taken) < 0.999
    assert 0.2 < np.std((taken - label)[unclipped]) < 0.4
    with pytest.raises(UsageError, match="action_noise must be a standard deviation in \\[0, 2\\], got -0.1"):
        generate(replace(base, action_noise=-0.1), tmp_path / "bad", progress=False)


def test_self_imitation_labels_each_episode_after_a_success_with_the_latest_successful_actions():
    """Trial 0 succeeds in episodes 2 and 4 (of 5): episodes 3 and 4 imitate 2 (4's own success comes later),
    episode 5 imitates 4; episodes 1-2 keep the expert's labels. Trial 1 never succeeds: all expert. Trial 2
    succeeds in episode 1 only: 2-5 imitate 1."""
    from icl_metarl.incontext.recording import ShardRecorder

    T, K, L = 3, 5, 4
    rec = ShardRecorder(["reach-v3"] * T, K, L, label=None)
    rng = np.random.default_rng(0)
    rec.taken[:], rec.expert[:] = rng.random(rec.taken.shape), rng.random(rec.expert.shape)
    rec.success[:] = 0
    rec.success[0, 1, 2] = rec.success[0, 3, 0] = rec.success[2, 0, 3] = 1
    taken, expert = rec.taken.copy(), rec.expert.copy()
    rec.imitate_successes()
    want = expert.copy()
    want[0, 2], want[0, 3], want[0, 4] = taken[0, 1], taken[0, 1], taken[0, 3]
    want[2, 1:] = taken[2, 0]
    np.testing.assert_array_equal(rec.expert, want)
    np.testing.assert_array_equal(rec.taken, taken)  # what was played is never rewritten


def test_self_imitation_settings_that_cannot_be_met(tmp_path):
    from icl_metarl.incontext.train import TrainConfig, pretrain

    with pytest.raises(UsageError, match="self_imitation .* needs a policy that plays every episode"):
        generate(GenerateConfig(trials=2, episodes_per_trial=2, episode_length=10, self_imitation=True),
                 tmp_path / "x", progress=False)
    data = tmp_path / "d"
    generate(GenerateConfig(task_pool="fresh", trials=2, episodes_per_trial=2, episode_length=10, trials_per_shard=2,
                            workers=1), data, progress=False)
    with pytest.raises(UsageError, match="relabel_self_imitation needs relabel_rounds >= 1 and relabel_handover 0, "
                                         "got relabel_rounds=1 and relabel_handover=1"):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), steps=2, relabel_rounds=1, relabel_handover=1,
                             relabel_self_imitation=True))
    with pytest.raises(UsageError, match="relabel_rounds=0"):
        pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), steps=2, relabel_self_imitation=True))


def test_pretrain_self_imitation_rounds_record_the_setting_and_keep_old_data_readable(tmp_path):
    """--relabel-self-imitation reaches the round's histories (its manifest says so); data written without it
    keeps its settings (no new key), so existing directories resume."""
    from icl_metarl.incontext.train import TrainConfig, pretrain

    data = tmp_path / "d"
    generate(GenerateConfig(task_pool="fresh", trials=2, episodes_per_trial=2, episode_length=10, trials_per_shard=2,
                            workers=1), data, progress=False)
    assert "self_imitation" not in load_histories(data).manifest["settings"]
    record = pretrain(TrainConfig(data=[str(data)], out=str(tmp_path / "r"), steps=4, batch_size=2, d_model=16,
                                  n_layer=1, n_head=2, episodes_per_window=2, relabel_rounds=1, relabel_trials=2,
                                  relabel_self_imitation=True, progress=False, log_every=1, checkpoint_every=0,
                                  tensorboard=False))
    assert np.isfinite(record["loss"])
    h = load_histories(tmp_path / "r" / "round-1" / "relabelled")
    assert h.manifest["settings"]["self_imitation"] is True and h.manifest["settings"]["policy"]
    assert "self-imitation" in h.manifest["source"]
