"""The decision interval (action repeat): an agent acts every k-th simulator step, its action held.

Checked against k = 1 with the action held by hand, against Meta-World's own evaluation loop, and at
the evaluator's edge (bad values, a checkpoint asked another interval); through the gradient learners
(sampler, budget, checkpoint), the probe, and the study's stages.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

from gradient_meta import meta_rl
from gradient_meta.config import MetaRLConfig
from gradient_meta.meta_rl import load_state, meta_train, state_path
from gradient_meta.rl_agent import load_agent as load_gradient_agent
from icl_metarl.harness import suites
from icl_metarl.harness.baselines import make_baseline
from icl_metarl.harness.budget import read_budget
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalAgent, EvalConfig, agent_action_repeat, evaluate, load_agents, trial_seed
from icl_metarl.harness.mw_adapter import evaluate_with_metaworld
from icl_metarl.harness.suites import TrialEnv, decisions_per_episode, get_suite, make_trial_envs
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig
from icl_metarl.probes.probe import probe
from icl_metarl.study import config as qc
from icl_metarl.study import quickstart as qs

TASK = get_suite("ML1:reach-v3").tasks("train", 0)[3]


def test_decisions_per_episode_is_the_ceiling():
    assert [decisions_per_episode(500, k) for k in (1, 2, 3, 4, 5)] == [500, 250, 167, 125, 100]
    assert decisions_per_episode(10, 20) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_intervals_are_one_line_errors(bad):
    with pytest.raises(UsageError, match="action repeat"):
        make_trial_envs([TASK], 10, action_repeat=bad)
    with pytest.raises(UsageError, match="action repeat"):
        EvalConfig(action_repeat=bad).check()


def test_a_held_action_equals_k_plain_steps():
    """Held for k steps: the summed reward, the last observation and the step count of k = 1 by hand."""
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (8, 4)).astype(np.float32)
    plain, held = TrialEnv(TASK, 20, seed=5), TrialEnv(TASK, 20, seed=5, action_repeat=3)
    plain.reset(), held.reset()
    for i, a in enumerate(actions[:7]):  # 7 decisions: 3 x 6 + 2 (the last holds the 2 steps left)
        obs, reward, _, truncated, info = held.step(a)
        rewards = []
        for _ in range(min(3, 20 - 3 * i)):
            p_obs, r, _, p_trunc, _ = plain.step(a)
            rewards.append(r)
        np.testing.assert_array_equal(obs, p_obs)
        assert reward == pytest.approx(sum(rewards), rel=1e-12)
        assert truncated == p_trunc == (i == 6)


def test_success_counts_at_any_simulator_step_and_its_step_is_the_simulator_step():
    """The oracle at k = 1 and k = 4 on the same tasks: both succeed, first success reported in simulator
    steps (within k - 1 of each other, since the held action changes the path only slightly)."""
    cfg = dict(suite="ML1:reach-v3", split="train", num_tasks=3, adaptation_episodes=0, evaluation_episodes=1,
               episode_length=150, seeds=(0,), progress=False)
    one = evaluate([EvalAgent("oracle", make_baseline("oracle"))], EvalConfig(**cfg))
    four = evaluate([EvalAgent("oracle", make_baseline("oracle"))], EvalConfig(**cfg, action_repeat=4))
    for a, b in zip(one["records"], four["records"]):
        assert a["success"] and b["success"]
        assert abs(a["steps_to_success"] - b["steps_to_success"]) <= 12
    assert four["agents"]["oracle"]["action_repeat"] == 4 and one["agents"]["oracle"]["action_repeat"] == 1


def test_metaworld_own_loop_agrees_at_an_interval():
    """The random agent at k = 3 through our evaluator and through Meta-World's evaluation (the adapter
    holds each action for 3 steps): the same actions, so the same returns to the last digit."""
    cfg = EvalConfig(suite="ML1:reach-v3", num_tasks=2, adaptation_episodes=1, evaluation_episodes=1,
                     episode_length=60, seeds=(0,), progress=False, batch_size=1, action_repeat=3)
    res = evaluate([EvalAgent("random", make_baseline("random"))], cfg)
    ours = [np.mean([r["return"] for r in res["records"] if r["task"] == j and r["phase"] == "evaluation"])
            for j in range(2)]
    agent = make_baseline("random")
    agent.action_repeat = 3  # the adapter reads the agent's interval, as it reads a checkpoint's
    mw = evaluate_with_metaworld(agent, cfg.tasks(), [trial_seed(0, j) for j in range(2)], 1, 1, 60)
    assert [c["return"] for c in mw["calls"]] == pytest.approx(ours, rel=1e-12)
    plain = evaluate_with_metaworld(make_baseline("random"), cfg.tasks(), [trial_seed(0, j) for j in range(2)], 1, 1, 60)
    assert [c["return"] for c in plain["calls"]] != pytest.approx(ours, rel=1e-6)  # k = 1 differs: the test can fail


def test_a_checkpoint_is_played_at_its_own_interval_and_refused_another():
    agent = make_baseline("random")
    assert agent_action_repeat(agent, None) == 1 and agent_action_repeat(agent, 3) == 3
    agent.action_repeat = 4
    agent.checkpoint = "runs/x"
    assert agent_action_repeat(agent, None) == 4 and agent_action_repeat(agent, 4) == 4
    with pytest.raises(UsageError, match="runs/x was trained to act every 4"):
        agent_action_repeat(agent, 2)


# ------------------------------------------------------------------------------ gradient learners
@pytest.fixture
def simulator_steps(monkeypatch):
    """Every simulator step any TrialEnv takes, counted beside it (a second count of what was played)."""
    count = [0]
    step = suites.TrialEnv.step

    def counting(self, action):
        before = self._t
        out = step(self, action)
        count[0] += self._t - before
        return out

    monkeypatch.setattr(suites.TrialEnv, "step", counting)
    return count


def test_a_gradient_learner_plays_at_its_interval_records_it_and_is_refused_another(tmp_path, simulator_steps,
                                                                                    monkeypatch):
    """maml-imitate at k = 3 on 10-step episodes: 4 decisions per episode (the expert labels each), the budget's
    env steps are the simulator steps the environments took, the checkpoint records k = 3 and the evaluator
    plays it at 3 and refuses 2 in one line."""
    shapes = []

    class Recording(meta_rl.Sampler):
        def sample(self, *args, **kw):
            rollout = super().sample(*args, **kw)
            shapes.append(tuple(rollout.rew.shape))
            return rollout

    monkeypatch.setattr(meta_rl, "Sampler", Recording)
    cfg = MetaRLConfig(algo="maml", outer_loss="imitate", suite="ML1:reach-v3", iterations=1, meta_batch=2,
                       episode_length=10, action_repeat=3, hidden=(4,), ppo_epochs=1, checkpoint_every=1)
    log = meta_train(cfg, tmp_path, progress=False)
    assert shapes == [(2, 1, 4), (2, 1, 4)]  # support and query episodes: (tasks, episodes, decisions)
    budget = read_budget(tmp_path)
    assert budget["env_steps"] == simulator_steps[0] == 4 * 10 == log[-1]["env_steps"]
    assert budget["expert_labels"] == 2 * 4  # the query episodes' decisions
    assert json.loads((tmp_path / "config.json").read_text())["config"]["action_repeat"] == 3

    agents = load_agents([str(tmp_path)])
    assert [a.agent.action_repeat for a in agents] == [3]
    plays = dict(suite="ML1:reach-v3", num_tasks=1, adaptation_episodes=1, evaluation_episodes=1, episode_length=10,
                 seeds=(0,), batch_size=1, progress=False)
    results = evaluate(agents, EvalConfig(**plays))
    assert not results["failures"] and results["agents"][agents[0].label]["action_repeat"] == 3
    with pytest.raises(UsageError, match="trained to act every 3 simulator steps") as e:
        evaluate(agents, EvalConfig(**plays, action_repeat=2))
    assert "\n" not in str(e.value)


def test_a_gradient_checkpoint_written_before_the_interval_reads_as_1_and_resumes(tmp_path):
    cfg = MetaRLConfig(algo="reptile", iterations=1, meta_batch=2, episode_length=6, hidden=(4,), checkpoint_every=1)
    meta_train(cfg, tmp_path, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["config"]["action_repeat"]  # as written before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors, meta = load_state(state_path(tmp_path, 0))
    saved = json.loads(meta["config"])
    del saved["action_repeat"]
    state_path(tmp_path, 0).write_bytes(save(tensors, {**meta, "config": json.dumps(saved)}))

    assert load_gradient_agent(tmp_path).action_repeat == 1
    assert load_gradient_agent(tmp_path, adaptive=False).action_repeat == 1
    log = meta_train(dataclasses.replace(cfg, iterations=2), tmp_path, progress=False)  # same run: resumes
    assert [r["iteration"] for r in log] == [1, 2]
    with pytest.raises(UsageError, match=r"other settings \(action_repeat, iterations\)"):
        meta_train(dataclasses.replace(cfg, iterations=3, action_repeat=2), tmp_path, progress=False)


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_a_bad_gradient_interval_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="action repeat"):
        MetaRLConfig(action_repeat=bad)


# ------------------------------------------------------------------------------------- the probe
def test_the_probe_plays_at_the_models_interval_per_decision(tmp_path):
    """A model trained at k = 2 with 20-token episodes: probed on 40-step episodes (its default), its arrays
    hold 20 decisions per episode, its episodes are the evaluator's at k = 2; another k, or more decisions
    than the model's episode, is refused."""
    torch.manual_seed(0)
    ICLPolicy(ICLPolicyConfig(d_model=16, n_layer=1, n_head=2, max_episode_length=20, max_context_episodes=2,
                              action_repeat=2)).save_pretrained(tmp_path / "ckpt")
    r = probe(tmp_path / "ckpt", "ML1:reach-v3", trials=2, seed=1, conditions=("zero_rewards",), ablate_heads=False)
    assert (r.config.episode_length, r.config.action_repeat) == (40, 2)
    assert r.example["episode_steps"] == 20 and r.model_info["context_episodes_probed"] == 2
    results = evaluate(load_agents([str(tmp_path / "ckpt")]),
                       EvalConfig(suite="ML1:reach-v3", split="test", adaptation_episodes=2, evaluation_episodes=0,
                                  episode_length=40, seeds=(1,), num_tasks=2, batch_size=2, progress=False))
    returns = np.zeros((2, 2))
    for rec in results["records"]:
        returns[rec["task"], rec["episode"]] = rec["return"]
    assert np.array_equal(r.baseline["return_by_trial"], returns)
    with pytest.raises(UsageError, match="trained to act every 2"):
        probe(tmp_path / "ckpt", "ML1:reach-v3", trials=1, action_repeat=3)
    with pytest.raises(UsageError, match="21 decisions"):
        probe(tmp_path / "ckpt", "ML1:reach-v3", trials=1, episode_length=41)


# -------------------------------------------------------------------------------------- the study
def test_the_study_hands_its_interval_to_every_stage_and_sections_may_not_set_it():
    cfg = qc.config_from_dict({"size": "tiny", "action_repeat": 3, "generate_extra": [{"noise_kind": "uniform"}]})
    for stage in ("generate", "meta-train", "evaluate", "probe"):
        assert qc.stage_config(cfg, stage).action_repeat == 3, stage
        assert qc.stage_config(cfg, stage).episode_length == cfg.episode_length  # still simulator steps
    assert [e.action_repeat for e in qc.extra_generate_configs(cfg)] == [3]
    assert qc.train_diagnostic_config(cfg).action_repeat == 3
    assert qc.config_from_dict(qc.to_dict(cfg)).action_repeat == 3
    for section in ("generate", "meta_train", "evaluate", "probe"):
        with pytest.raises(UsageError, match="action_repeat"):
            qc.config_from_dict({"size": "tiny", section: {"action_repeat": 2}})
    with pytest.raises(UsageError, match="action repeat"):
        qc.config_from_dict({"size": "tiny", "action_repeat": 0})


def test_the_default_interval_is_1_everywhere_and_leaves_finished_stages_valid(tmp_path):
    """At k = 1 (every shipped file) each stage acts at 1, baselines included, and its marker settings are those
    written before the setting existed, as are markers written while only generation and evaluation had it."""
    cfg = qc.tiny()
    for stage in ("generate", "meta-train", "evaluate", "probe"):
        assert qc.stage_config(cfg, stage).action_repeat == 1
        assert "action_repeat" not in qs.stage_settings(cfg, stage, tmp_path)
    settings = qs.stage_settings(cfg, "evaluate", tmp_path)
    qs.mark_done(tmp_path, "evaluate", {**settings, "action_repeat": None}, 1.0, {})
    assert qs.stage_done(tmp_path, "evaluate", settings)
    qs.mark_done(tmp_path, "generate", {**qs.stage_settings(cfg, "generate", tmp_path), "action_repeat": 1}, 1.0, {})
    assert qs.stage_done(tmp_path, "generate", qs.stage_settings(cfg, "generate", tmp_path))
    other = qc.config_from_dict({"size": "tiny", "action_repeat": 2})
    with pytest.raises(UsageError, match="action_repeat=None, not 2"):
        qs.stage_done(tmp_path, "generate", qs.stage_settings(other, "generate", tmp_path))
