"""Budget accounting: every training run writes budget.json into its checkpoint, its counts equal a second
way of counting (the histories' arrays, the meta-training log, a formula), a killed and resumed run ends
with the same counts, and the evaluation report shows them beside the agent."""

import dataclasses
import json
import os

import pytest
import torch

from gradient_meta.meta_rl import KILL_ENV, MetaRLConfig, meta_train
from icl_metarl.harness.budget import Budget, read_budget, run_budget
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents
from icl_metarl.harness.report import compact, report_markdown
from icl_metarl.incontext.histories import GenerateConfig, generate
from icl_metarl.incontext.shards import load_histories
from icl_metarl.incontext.train import TrainConfig, data_budget, pretrain

torch.set_num_threads(1)  # tiny runs: a second thread only adds contention on a shared CPU
COUNTS = ("env_steps", "expert_labels", "optimizer_steps", "seeds")


class Killed(Exception):
    """Stands in for the SIGKILL of the trainers' fault injection: nothing after it is written."""


@pytest.fixture
def no_sigkill(monkeypatch):
    def kill(pid, sig):
        raise Killed

    monkeypatch.setattr(os, "kill", kill)


# ------------------------------------------------------------------------------------ in-context
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "d"
    generate(GenerateConfig(task_pool="fresh", trials=2, episodes_per_trial=2, episode_length=10, trials_per_shard=1,
                            workers=1, seed=7), out, progress=False)
    return out


def _pretrain_cfg(data, out, **kw):
    return TrainConfig(data=[str(data)], out=str(out), steps=8, batch_size=2, d_model=16, n_layer=1, n_head=2,
                       episodes_per_window=2, relabel_rounds=1, relabel_trials=2, progress=False, log_every=1,
                       checkpoint_every=2, tensorboard=False, seed=3, **kw)


@pytest.fixture(scope="module")
def icl_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "straight"
    pretrain(_pretrain_cfg(data, out))
    return out


def test_pretrain_budget_counts_the_histories_steps_and_the_optimizer_steps(data, icl_run):
    b = read_budget(icl_run)
    dirs = [data, icl_run / "round-1" / "relabelled"]
    steps = sum(load_histories(d).num_steps for d in dirs)  # second way: the rows of the shards' arrays
    assert steps == 2 * (2 * 2 * 10)  # base data and one relabelling round, each counted once
    assert b["env_steps"] == b["expert_labels"] == steps  # target 'expert': every step is labelled
    assert b["optimizer_steps"] == 8  # over both rounds (4 + 4)
    assert b["seeds"] == {"train": [3], "data": [7]}
    # generation CPU of both directories is in the total, beside the two rounds' training CPU
    assert b["data_cpu_minutes"] > 0 and b["train_cpu_minutes"] > 0 and b["wall_minutes"] > 0
    assert b["cpu_minutes"] == pytest.approx(b["data_cpu_minutes"] + b["train_cpu_minutes"], abs=1e-3)
    # each round's own budget.json counts its own optimizer steps and the data it trained on
    r0, r1 = (read_budget(icl_run / f"round-{r}" / "train") for r in (0, 1))
    assert (r0["optimizer_steps"], r1["optimizer_steps"]) == (4, 4)
    assert (r0["env_steps"], r1["env_steps"]) == (steps // 2, steps)
    assert json.loads((icl_run / "round-0" / "train" / "checkpoints" / "step-00000004" / "trainer_state.json")
                      .read_text())["budget"]["optimizer_steps"] == 4  # the counters ride in the resumable state


def test_a_relabelling_phase_reports_the_runs_budget_so_far(icl_run):
    first, last = (icl_run / f"round-{r}" / "train" for r in (0, 1))
    own = read_budget(last)  # the phase's own loop only: fewer optimizer steps than the run's
    assert own["optimizer_steps"] < read_budget(icl_run)["optimizer_steps"]
    assert run_budget(first) == read_budget(first)  # nothing before phase 0
    shown = load_agents([str(last)])[0].agent.describe()["budget"]  # what the evaluation report shows
    run = read_budget(icl_run)
    assert {k: shown[k] for k in COUNTS} == {k: run[k] for k in COUNTS}
    assert shown["train_cpu_minutes"] == pytest.approx(run["train_cpu_minutes"], abs=1e-3)
    assert run_budget(icl_run) == run  # a run's own directory: its own budget


def test_killed_and_resumed_pretrain_ends_with_the_same_counts(data, icl_run, tmp_path, no_sigkill):
    out = tmp_path / "crashed"
    with pytest.raises(Killed):  # round 0 checkpoints at step 2, is killed after step 3: step 3 is redone
        pretrain(_pretrain_cfg(data, out, kill_after=3))
    assert not (out / "budget.json").exists()
    pretrain(_pretrain_cfg(data, out, resume=True))
    got, want = read_budget(out), read_budget(icl_run)
    assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}
    for r in (0, 1):
        got, want = read_budget(out / f"round-{r}" / "train"), read_budget(icl_run / f"round-{r}" / "train")
        assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}


def test_data_budget_counts_expert_labels_by_target_and_hand_over():
    def manifest(steps, policy="", handover=0, cpu=True):
        shard = {"steps": steps, **({"cpu_seconds": 6.0} if cpu else {})}
        return {"settings": {"episodes_per_trial": 3, "seed": 1, "policy": policy, "handover": handover},
                "shards": {"00000": shard, "00001": dict(shard)}}

    expert, policy, handover = manifest(30), manifest(30, "p"), manifest(30, "p", handover=1)
    assert data_budget([expert, policy, handover], "expert").expert_labels == 60 + 60 + 40  # hand-over: unlabelled
    assert data_budget([expert, policy, handover], "taken").expert_labels == 60 + 0 + 40  # the expert's own actions
    b = data_budget([expert, policy], "expert")
    assert (b.env_steps, b.data_cpu_minutes, b.seeds["data"]) == (120, pytest.approx(0.4), [1])
    assert data_budget([expert, manifest(30, cpu=False)], "expert").data_cpu_minutes is None  # not recorded


def test_budget_add_and_json_round_trip():
    a = Budget(1, 2, 3, 1.5, 0.5, 2.0, {"train": [0], "data": [4]})
    b = Budget(10, 0, 30, 1.0, None, 1.0, {"train": [1], "data": [4]})
    s = a.add(b)
    assert (s.env_steps, s.expert_labels, s.optimizer_steps, s.data_cpu_minutes) == (11, 2, 33, None)
    assert s.cpu_minutes == pytest.approx(2.5) and s.seeds == {"train": [0, 1], "data": [4]}
    assert Budget.from_json(a.to_json()) == a and a.to_json()["cpu_minutes"] == 2.0


def test_a_budget_read_back_and_written_again_is_the_same_file():
    # 0.00136 + 0.00708 = 0.00844 rounds to 0.0084, but the file shows 0.0014 and 0.0071, which sum to 0.0085:
    # cpu_minutes is the sum of the rounded figures, so a phase's budget re-read by run_budget equals its file
    j = Budget(train_cpu_minutes=0.00136, data_cpu_minutes=0.00708).to_json()
    assert (j["train_cpu_minutes"], j["data_cpu_minutes"], j["cpu_minutes"]) == (0.0014, 0.0071, 0.0085)
    assert Budget.from_json(j).to_json() == j
    assert Budget(train_cpu_minutes=0.00136, data_cpu_minutes=None).to_json()["cpu_minutes"] == 0.0014


# ------------------------------------------------------------------------------- gradient meta-RL
META = MetaRLConfig(algo="maml", iterations=4, meta_batch=2, episode_length=8, hidden=(4,), ppo_epochs=2,
                    checkpoint_every=2, seed=5)


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "maml"
    log = meta_train(META, out, progress=False)
    return out, log


def test_meta_rl_budget_counts_every_sampled_step_and_optimizer_step(maml_run):
    out, log = maml_run
    b = read_budget(out)
    c = META.resolved()  # query_episodes: the algorithm's
    assert b["env_steps"] == c.iterations * c.meta_batch * (c.adapt_episodes + c.query_episodes) * c.episode_length
    assert b["env_steps"] == log[-1]["env_steps"]  # second way: the sampler's own count, in the log
    assert b["expert_labels"] == 0  # reward only
    assert b["optimizer_steps"] == c.iterations * c.ppo_epochs  # MAML: one Adam step per PPO epoch
    assert b["seeds"] == {"train": [5], "data": [5]} and b["data_cpu_minutes"] == 0 and b["cpu_minutes"] > 0


def test_reptile_counts_one_optimizer_step_per_iteration(tmp_path):
    cfg = dataclasses.replace(META, algo="reptile", iterations=2)
    meta_train(cfg, tmp_path, progress=False)
    assert read_budget(tmp_path)["optimizer_steps"] == 2


def test_killed_and_resumed_meta_training_ends_with_the_same_counts(maml_run, tmp_path, monkeypatch, no_sigkill):
    monkeypatch.setenv(KILL_ENV, "3")  # after iteration 3, past the checkpoint of iteration 2: 3 is redone
    with pytest.raises(Killed):
        meta_train(META, tmp_path, progress=False)
    assert read_budget(tmp_path)["optimizer_steps"] == 2 * META.ppo_epochs  # the checkpoint's counts
    monkeypatch.delenv(KILL_ENV)
    meta_train(META, tmp_path, progress=False)
    got, want = read_budget(tmp_path), read_budget(maml_run[0])
    assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}


# ----------------------------------------------------------------------------------------- report
def test_compact_numbers():
    assert [compact(n) for n in (0, 950, 1000, 1500, 40_000, 999_600, 1_234_567)] == \
           ["0", "950", "1k", "1.5k", "40k", "1M", "1.2M"]


def test_report_shows_each_checkpoints_budget_and_blanks_for_baselines(icl_run, maml_run):
    agents = load_agents([str(icl_run), str(maml_run[0]), "random"])
    assert agents[0].agent.describe()["budget"] == read_budget(icl_run)
    cfg = EvalConfig(num_tasks=1, adaptation_episodes=1, evaluation_episodes=1, episode_length=8, seeds=(0,),
                     progress=False)
    md = report_markdown(evaluate(agents, cfg), num_resamples=50)
    assert "| env steps | expert labels | optimizer steps | CPU min |" in md
    table = md.split("## Agents")[1].split("## ")[0]
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    for agent, run in zip(agents[:2], (icl_run, maml_run[0])):
        b = read_budget(run)
        cells = rows[agent.label].split(" | ")[-4:]
        assert cells[:3] == [compact(b["env_steps"]), compact(b["expert_labels"]), compact(b["optimizer_steps"])]
    assert rows["random"].endswith("|  |  |  |  |")


def test_relabelling_from_an_init_plays_it_first_and_counts_its_loop(data, icl_run, tmp_path):
    """relabel_from_init: the --init-from policy plays round 1 as it is (no phase on the base data alone),
    all the steps go to the phase after it, and the run's budget counts the init's training loop too."""
    out = tmp_path / "from-init"
    pretrain(_pretrain_cfg(data, out, init_from=str(icl_run), relabel_from_init=True))
    assert not (out / "round-0" / "train" / "model.safetensors").exists()  # no training before round 1
    assert read_budget(out / "round-1" / "train")["optimizer_steps"] == 8  # every step after the round
    b, init = read_budget(out), read_budget(icl_run)
    assert b["optimizer_steps"] == 8 + init["optimizer_steps"]
    assert b["train_cpu_minutes"] > init["train_cpu_minutes"]
    relabelled = json.loads((out / "round-1" / "relabelled" / "manifest.json").read_text())["settings"]
    assert relabelled["policy"] == str(icl_run)  # the init itself played round 1
    with pytest.raises(UsageError, match="relabel_from_init needs --init-from"):
        pretrain(_pretrain_cfg(data, tmp_path / "x", relabel_from_init=True))


@pytest.fixture
def round_players(monkeypatch):
    """How each checkpoint loaded to play relabelled trials explores: (episodes, scale, kind) per shard."""
    from icl_metarl.incontext.agent import InContextAgent

    players, loaded = [], InContextAgent.from_pretrained

    def spy(path, **kw):
        agent = loaded(path, **kw)
        players.append((agent.explore_episodes, agent.explore_scale, agent.explore_kind))
        return agent

    monkeypatch.setattr(InContextAgent, "from_pretrained", spy)
    return players


def test_relabelling_rounds_play_with_the_runs_exploration_kind(data, icl_run, tmp_path, round_players):
    """--explore-kind step: the round's trials are played by a checkpoint that explores at every decision;
    from an init, round 1 explores as the init's config.json says unless --relabel-init-explores."""
    step = dict(explore_episodes=1, explore_scale=0.5, explore_kind="step")
    out = tmp_path / "step"
    pretrain(_pretrain_cfg(data, out, **step))
    assert round_players and set(round_players) == {(1, 0.5, "step")}  # every shard of round 1, the round-0 checkpoint
    assert json.loads((out / "config.json").read_text())["explore_kind"] == "step"

    round_players.clear()
    pretrain(_pretrain_cfg(data, tmp_path / "init", init_from=str(icl_run), relabel_from_init=True, **step))
    assert set(round_players) == {(0, 0.0, "offset")}  # the init as its own config.json says (the recipes as measured)
    round_players.clear()
    out = tmp_path / "init-explores"
    pretrain(_pretrain_cfg(data, out, init_from=str(icl_run), relabel_from_init=True, relabel_init_explores=True, **step))
    assert set(round_players) == {(1, 0.5, "step")}
    settings = json.loads((out / "round-1" / "relabelled" / "manifest.json").read_text())["settings"]
    assert (settings["policy_explore_episodes"], settings["policy_explore_kind"]) == (1, "step")  # provenance

    with pytest.raises(UsageError, match="unknown explore-kind 'sample'; valid: offset, step"):
        pretrain(_pretrain_cfg(data, tmp_path / "x", explore_kind="sample"))
    with pytest.raises(UsageError, match="relabel_init_explores needs relabel_from_init"):
        pretrain(_pretrain_cfg(data, tmp_path / "x", relabel_init_explores=True))
    with pytest.raises(UsageError, match="policy_explore_kind: only a policy explores"):
        generate(GenerateConfig(trials=1, policy_explore_kind="step"), tmp_path / "x", progress=False)
    with pytest.raises(UsageError, match="unknown policy_explore_kind 'x'"):
        generate(GenerateConfig(trials=1, policy=str(icl_run), policy_explore_kind="x"), tmp_path / "x", progress=False)


def test_a_run_from_an_init_counts_its_loops_and_the_union_of_the_two_runs_data(data, icl_run, tmp_path):
    """A plain run started from another (--init-from) pays for the init too: the init's training loops, and the
    data the init trained on that the run does not (the union, so the base data both read counts once)."""
    init = read_budget(icl_run)  # trained on the base data and its own relabelled round
    out = tmp_path / "more-steps"
    cfg = TrainConfig(data=[str(data)], out=str(out), steps=3, batch_size=2, d_model=16, n_layer=1, n_head=2,
                      episodes_per_window=2, progress=False, log_every=1, tensorboard=False, seed=3,
                      init_from=str(icl_run))
    pretrain(cfg)
    b = read_budget(out)
    assert b["optimizer_steps"] == 3 + init["optimizer_steps"]
    assert (b["env_steps"], b["expert_labels"]) == (init["env_steps"], init["expert_labels"])  # the union
    assert b["data_cpu_minutes"] == pytest.approx(init["data_cpu_minutes"], abs=1e-3)
    assert init["train_cpu_minutes"] < b["train_cpu_minutes"]
    # its checkpoints carry the same accounting as the run
    last = sorted((out / "checkpoints").iterdir())[-1]
    assert json.loads((last / "trainer_state.json").read_text())["budget"]["optimizer_steps"] == 3
    assert read_budget(last)["optimizer_steps"] == 3 + init["optimizer_steps"]
    # the init's data gone from the disk: said, and the rest still counted
    moved = tmp_path / "init"
    moved.mkdir()
    for name in ("budget.json", "config.json", "model.safetensors", "training.json"):
        (moved / name).write_bytes((icl_run / name).read_bytes())
    record = json.loads((moved / "training.json").read_text())
    (moved / "training.json").write_text(json.dumps({**record, "data": [*record["data"], str(tmp_path / "gone")]}))
    with pytest.warns(UserWarning, match="gone"):
        pretrain(dataclasses.replace(cfg, out=str(tmp_path / "from-moved"), init_from=str(moved)))
    assert read_budget(tmp_path / "from-moved")["env_steps"] == init["env_steps"]
