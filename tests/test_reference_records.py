"""Every figure reproduces across refactors: records played now equal records saved before the harness
moved (tests/fixtures/reference_records.json, written by the code as it stood at commit 463bee0).

Covers what the one rollout loop now plays: the evaluator (random, oracle, an exploring in-context
checkpoint across a window re-encoding, a MAML checkpoint), history generation (the noisy expert, and a
policy's hand-over trials) and one iteration of gradient meta-training (its sampler).

Values that pass through torch's float kernels (a trained agent's actions, and so the returns and
states of its episodes) are not compared bit for bit: the kernels differ between CPUs, and the simulator
amplifies a last-bit difference in an action over an episode (on the 2-core AVX-512 container of session
9 the file's returns were reproduced to 1e-8 in the first episodes and to 2% after a gradient step, the states
of a policy's hand-over trials not byte for byte). Their returns are compared to 5%, their successes and
steps to success exactly. Everything else (the expert's histories, the
counts, successes, steps to success, task order, the labels) is compared exactly.

Regenerate the file only on purpose: ``ICL_METARL_WRITE_REFERENCE=1 pytest tests/test_reference_records.py``
rewrites it from what the code plays now (every comparison then passes by construction), so the file's
digest is pinned below: a rewrite fails until ``REFERENCE_SHA256`` is changed with it, in the same commit.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gradient_meta.meta_rl import MetaRLConfig, meta_train
from icl_metarl.harness.evaluation import EvalConfig, evaluate, load_agents
from icl_metarl.incontext.histories import GenerateConfig, generate
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig

REFERENCE = Path(__file__).parent / "fixtures" / "reference_records.json"
WRITE = os.environ.get("ICL_METARL_WRITE_REFERENCE") == "1"
#: sha256 of the file as the code at commit 463bee0 wrote it (committed in 2194db3)
REFERENCE_SHA256 = "c6d5b4ccf8d337ced76e8b0cf609621c0fad5b832f258bf3e579ad149dac5df0"
LENGTH = 50
#: the reach expert's correction every reach study names (the table the code applied by default at 463bee0)
REACH = ("reach-v3=0,0,0.045",)


def _icl_checkpoint(path: Path) -> Path:
    """A seeded, untrained in-context policy that explores in episode 1 and holds 2 episodes of context
    (so a 3-episode trial re-encodes its window once)."""
    torch.manual_seed(0)
    config = ICLPolicyConfig(d_model=32, n_layer=2, n_head=2, max_episode_length=LENGTH, max_context_episodes=2,
                             explore_episodes=1, explore_scale=0.3)
    ICLPolicy(config).save_pretrained(path)
    return path


def _maml_checkpoint(path: Path) -> tuple[Path, dict]:
    cfg = MetaRLConfig(algo="maml", iterations=1, meta_batch=2, episode_length=LENGTH, hidden=(8, 8), ppo_epochs=1,
                       checkpoint_every=1)
    log = meta_train(cfg, path, progress=False)
    row = {k: v for k, v in log[0].items() if k not in ("sample_s", "learn_s")}
    return path, row


def _records(tmp_path: Path) -> dict:
    icl = _icl_checkpoint(tmp_path / "icl")
    maml, meta_row = _maml_checkpoint(tmp_path / "maml")
    agents = load_agents(["random", "oracle", str(icl), str(maml)], non_adaptive=True,
                         options={"expert_goal_offsets": REACH})
    config = EvalConfig(suite="ML1:reach-v3", num_tasks=3, adaptation_episodes=2, evaluation_episodes=1,
                        episode_length=LENGTH, seeds=(0, 1), batch_size=3, progress=False)
    import warnings

    with warnings.catch_warnings():  # the window re-encoding warns once; expected here
        warnings.simplefilter("ignore")
        results = evaluate(agents, config)
    records = [{k: r[k] for k in ("agent", "seed", "task", "episode", "success", "return", "steps_to_success")}
               for r in results["records"]]
    histories = {}
    expert = GenerateConfig(suite="ML1:reach-v3", task_pool="fresh", trials=2, episodes_per_trial=2,
                            episode_length=20, noise_kind="goal", noise_schedule="random", noise_max=0.15,
                            trials_per_shard=2, workers=1, expert_goal_offsets=REACH)
    histories["expert"] = generate(expert, tmp_path / "h-expert", progress=False)["shards"]
    handover = GenerateConfig(suite="ML1:reach-v3", task_pool="fresh", trials=2, episodes_per_trial=3,
                              episode_length=LENGTH, noise_kind="uniform", noise_max=0.5, trials_per_shard=2,
                              workers=1, policy=str(icl), handover=1, seed=3, expert_goal_offsets=REACH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        histories["handover"] = generate(handover, tmp_path / "h-handover", progress=False)["shards"]
    return {"records": records, "histories": {k: {n: s["sha256"] for n, s in v.items()} for k, v in histories.items()},
            "meta_train": meta_row}


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    return _records(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def saved(played):
    """The reference file (first rewritten from ``played`` under ICL_METARL_WRITE_REFERENCE=1)."""
    if WRITE:
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(played, indent=1) + "\n")
    return json.loads(REFERENCE.read_text())


def test_the_reference_file_is_the_one_written_before_the_move(saved):
    """A file rewritten by a changed version (which its own comparisons below would pass) fails here."""
    digest = hashlib.sha256(REFERENCE.read_bytes()).hexdigest()
    assert digest == REFERENCE_SHA256, (
        f"{REFERENCE.name} has sha256 {digest}, not the one written at 463bee0: if it was rewritten on "
        f"purpose, say why and set REFERENCE_SHA256 to it in the same commit")


def test_evaluator_records_equal_the_saved_ones(played, saved):
    saved = saved["records"]
    assert len(played["records"]) == len(saved) == 6 * 2 * 3 * 3  # agents x seeds x tasks x episodes
    for got, want in zip(played["records"], saved):
        assert {k: got[k] for k in ("agent", "seed", "task", "episode", "success", "steps_to_success")} == \
               {k: want[k] for k in ("agent", "seed", "task", "episode", "success", "steps_to_success")}
        exact = got["agent"] in ("random", "oracle")  # no torch kernel between their seeds and their actions
        assert got["return"] == pytest.approx(want["return"], rel=1e-9 if exact else 5e-2, abs=1e-9), (got, want)
    # the file is not trivial: agents differ, and some episodes succeed
    assert len({round(r["return"], 6) for r in saved}) > 20
    assert any(r["success"] for r in saved) and not all(r["success"] for r in saved)


#: the fields of a policy's hand-over trials that its float actions shape (see the module docstring)
POLICY_FLOAT_FIELDS = ("obs", "actions", "rewards")


def test_generated_histories_equal_the_saved_ones(played, saved):
    saved = saved["histories"]
    assert played["histories"]["expert"] == saved["expert"]  # no torch in the expert's trials: byte for byte
    assert played["histories"].keys() == saved.keys()
    assert played["histories"]["handover"].keys() == saved["handover"].keys()
    for shard, fields in saved["handover"].items():
        got = played["histories"]["handover"][shard]
        assert got.keys() == fields.keys()
        for field, digest in fields.items():
            if field not in POLICY_FLOAT_FIELDS:
                assert got[field] == digest, (shard, field)


def test_meta_training_iteration_equals_the_saved_one(played, saved):
    saved = saved["meta_train"]
    got = played["meta_train"]
    assert set(got) == set(saved)
    for k, v in saved.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=2e-3), k  # returns are stored to 3 decimals
    assert np.isfinite(got["loss"])
