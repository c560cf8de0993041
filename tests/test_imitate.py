"""The supervision-matched gradient learner (issue 22): MAML and Meta-SGD whose reward-only inner step is
meta-trained to imitate the scripted expert on the states the adapted policy visits (GMPS's idea)."""

import dataclasses

import numpy as np
import pytest
import torch

from gradient_meta import rl
from gradient_meta.functional import adapt_tasks, meta_gradient
from gradient_meta.meta_rl import MetaRLConfig, build_learner, meta_train
from gradient_meta.policy import PolicyConfig, init_policy
from gradient_meta.rl import ObsNorm, Sampler, advantages, inner_loss, make_imitation_loss, to_batch
from icl_metarl.harness import registry, suites
from icl_metarl.harness.budget import read_budget
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents
from icl_metarl.harness.suites import get_suite
from tests.test_meta_rl import check_against_loop

L = 12


@pytest.fixture(scope="module")
def labelled_batches():
    """Support episodes (reward only) and expert-labelled query episodes of 3 reach tasks; ``calls``: what
    the expert was asked (observations and goals) and answered, step by step."""
    tasks = get_suite("ML1:reach-v3").tasks("train")[:3]
    params = init_policy(PolicyConfig(hidden=(16,)), torch.Generator().manual_seed(0))
    sampler = Sampler(tasks, L)
    g = torch.Generator().manual_seed(2)
    calls, real = [], rl.expert_actions

    def spy(names, obs, goals, goal_offsets=None):
        calls.append((np.array(obs), np.array(goals), real(names, obs, goals, goal_offsets)))
        return calls[-1][2]

    rl.expert_actions = spy
    try:
        pre = sampler.sample(params, ObsNorm(), 2, g, per_task=False)
        support = to_batch(pre, advantages(pre, 0.99, 0.95))
        asked_before_query = len(calls)
        post = sampler.sample(adapt_tasks(inner_loss, params, support, 0.1), ObsNorm(), 1, g, per_task=True,
                              label_expert=True)
    finally:
        rl.expert_actions = real
        sampler.close()
    assert asked_before_query == 0  # the support episodes never ask the expert
    return tasks, params, pre, support, post, to_batch(post, advantages(post, 0.99, 0.95)), calls


def test_query_episodes_carry_the_experts_action_at_every_visited_state(labelled_batches):
    tasks, _, pre, support, post, query, calls = labelled_batches
    assert pre.expert is None and "expert" not in support  # the support episodes are never labelled
    assert post.expert.shape == post.act.shape and query["expert"].shape == query["act"].shape
    assert len(calls) == L  # once per step, for all trials at once
    for t, (obs, goals, answer) in enumerate(calls):
        np.testing.assert_allclose(obs, post.raw_obs[:, 0, t].numpy())  # asked at the states visited
        np.testing.assert_allclose(answer, post.expert[:, 0, t].numpy())
        assert np.abs(goals[0] - goals[1]).max() > 1e-3  # each trial's own goal
    np.testing.assert_allclose(calls[0][1], calls[-1][1])  # the same goals all episode
    assert np.abs(obs[:, -3:]).max() == 0  # the observation itself hides the goal
    assert not torch.allclose(post.expert, post.act)  # labels, not the actions taken


@pytest.mark.parametrize("steps,learned", [(1, False), (2, False), (1, True)])
def test_imitation_meta_gradient_equals_a_per_task_autograd_loop(labelled_batches, steps, learned):
    _, params, _, support, _, query, _ = labelled_batches
    check_against_loop(params, support, query, make_imitation_loss(), steps, learned)


def test_imitation_meta_gradient_matches_finite_differences(labelled_batches):
    _, params, _, support, _, query, _ = labelled_batches
    outer = make_imitation_loss()
    p64 = {k: v.double() for k, v in params.items()}
    sup = {k: v.double() for k, v in support.items()}
    qry = {k: v.double() for k, v in query.items()}
    got = meta_gradient(inner_loss, outer, p64, sup, qry, 0.05, 1, learn_step_size=False, vectorise=True)

    def meta_loss(p):
        adapted = adapt_tasks(inner_loss, p, sup, 0.05, 1)
        return float(torch.stack([outer({k: v[i] for k, v in adapted.items()}, {k: v[i] for k, v in qry.items()})
                                  for i in range(3)]).mean())

    eps = 1e-6
    for key, index in (("log_std", (0,)), ("layer1.bias", (3,)), ("layer0.weight", (2, 5))):
        up = {k: v.clone() for k, v in p64.items()}
        down = {k: v.clone() for k, v in p64.items()}
        up[key][index] += eps
        down[key][index] -= eps
        fd = (meta_loss(up) - meta_loss(down)) / (2 * eps)
        assert float(got.params[key][index]) == pytest.approx(fd, rel=1e-4, abs=1e-7)


def test_the_inner_step_never_reads_an_expert_label(labelled_batches):
    """Poisoning expert labels with NaN changes neither the adapted policy nor (on the support) the
    meta-gradient; on the query it does (the outer loss reads them), so the poison is real."""
    _, params, _, support, _, query, _ = labelled_batches
    poisoned = {**support, "expert": torch.full_like(support["act"], float("nan"))}
    clean, dirty = (adapt_tasks(inner_loss, params, s, 0.1) for s in (support, poisoned))
    for k in params:
        assert torch.equal(clean[k], dirty[k])
    outer = make_imitation_loss()
    a = meta_gradient(inner_loss, outer, params, support, query, 0.1, 1, learn_step_size=False, vectorise=True)
    b = meta_gradient(inner_loss, outer, params, poisoned, query, 0.1, 1, learn_step_size=False, vectorise=True)
    for k in params:
        assert torch.equal(a.params[k], b.params[k])
    bad_query = {**query, "expert": torch.full_like(query["expert"], float("nan"))}
    c = meta_gradient(inner_loss, outer, params, support, bad_query, 0.1, 1, learn_step_size=False, vectorise=True)
    assert all(torch.isnan(v).any() for v in c.params.values())


CFG = MetaRLConfig(algo="maml", outer_loss="imitate", task_pool="fresh", iterations=2, meta_batch=2,
                   episode_length=10, hidden=(8,), ppo_epochs=2, checkpoint_every=1, seed=3)


@pytest.fixture(scope="module")
def imitate_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("imitate") / "run"
    log = meta_train(CFG, out, progress=False)
    return out, log


def test_training_counts_the_expert_labels_of_the_query_episodes(imitate_run):
    out, log = imitate_run
    b = read_budget(out)
    c = CFG.resolved()  # query_episodes: the algorithm's
    assert b["expert_labels"] == c.iterations * c.meta_batch * c.query_episodes * c.episode_length
    assert b["env_steps"] == c.iterations * c.meta_batch * (c.adapt_episodes + c.query_episodes) * c.episode_length
    assert all(np.isfinite(r["loss"]) for r in log)


def test_at_test_time_expert_labels_poisoned_with_nan_change_nothing(imitate_run, tmp_path, monkeypatch):
    """The evaluated agent adapts from reward alone: make every expert label NaN and its records stay the same."""
    out, _ = imitate_run
    config = EvalConfig(suite="ML1:reach-v3", adaptation_episodes=2, evaluation_episodes=1, episode_length=10,
                        seeds=(0,), num_tasks=2, batch_size=2).check()
    agent = load_agents([str(out)])[0]
    assert not agent.agent.privileged and agent.label.startswith("maml-imitate")
    clean = evaluate(load_agents([str(out)]), config, tmp_path / "clean")["records"]
    nan = lambda names, obs, goals, offsets=None: np.full((len(obs), 4), np.nan, np.float32)  # noqa: E731
    monkeypatch.setattr(suites, "expert_actions", nan)
    monkeypatch.setattr(rl, "expert_actions", nan)
    dirty = evaluate(load_agents([str(out)]), config, tmp_path / "dirty")["records"]
    key = lambda r: (r["task"], r["episode"], r["return"], r["success"])  # noqa: E731
    assert sorted(map(key, clean)) == sorted(map(key, dirty)) and len(clean) == 2 * 3
    # and training with poisoned labels does read them: its loss is NaN
    log = meta_train(dataclasses.replace(CFG, iterations=1), tmp_path / "poisoned", progress=False)
    assert np.isnan(log[-1]["loss"])


def test_registered_learners_and_bad_settings():
    for name, algo in (("maml-imitate", "maml"), ("meta-sgd-imitate", "meta-sgd")):
        learner = registry.get(name)
        assert learner.fixed == {"algo": algo, "outer_loss": "imitate"}
    assert build_learner(dataclasses.replace(CFG, algo="meta-sgd"), init_policy(PolicyConfig(hidden=(4,)))).step_sizes
    with pytest.raises(UsageError, match="reptile has no outer loss"):
        MetaRLConfig(algo="reptile", outer_loss="imitate")
    with pytest.raises(UsageError, match="'dagger'.*ppo, imitate"):
        MetaRLConfig(outer_loss="dagger")


def test_labels_follow_the_configured_expert_goal_offsets():
    """The imitation learner's labels come from the expert told the goal shifted as the study says (the
    histories' correction), and from the plain expert when it names none."""
    from icl_metarl.harness.agent import Privileged
    from icl_metarl.harness.suites import expert_actions, parse_goal_offsets

    goals = np.array([[0.0, 0.7, 0.2], [0.1, 0.8, 0.1]])
    obs = np.zeros((2, 39))
    obs[:, :3] = goals  # at the goal: a shifted goal changes the expert's action
    params = init_policy(PolicyConfig(hidden=(8,)), torch.Generator().manual_seed(0))
    offsets = parse_goal_offsets(["reach-v3=0,0,0.045"])
    labels = []
    for table in (None, offsets):
        agent = rl.GaussianAgent(params, ObsNorm(), torch.Generator().manual_seed(0), per_task=False,
                                 label_expert=True, goal_offsets=table)
        agent.act_privileged(obs, Privileged(["reach-v3"] * 2, goals))
        labels.append(agent.steps["expert"][0].numpy())
        np.testing.assert_array_equal(labels[-1], expert_actions(["reach-v3"] * 2, obs, goals, table))
    assert not np.array_equal(labels[0], labels[1])
    assert MetaRLConfig(expert_goal_offsets=("reach-v3=0,0,0.045",)).expert_goal_offsets
    with pytest.raises(UsageError, match="not an environment of suite ML1:reach-v3"):
        MetaRLConfig(expert_goal_offsets=("push-v3=0,0,0.01",))
