"""scripts/keep_check.py: where the in-context agent goes after it found a success."""

import json

import numpy as np
import torch
from _scripts import load_script

from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig

keep_check = load_script("keep_check")


def test_an_unknown_environment_is_a_one_line_error(tmp_path, capsys):
    assert keep_check.main(["nowhere", "--envs", "door-open-v3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "door-open-v3" in err and "reach-v3" in err and len(err.strip().splitlines()) == 1


def test_one_reach_trial_is_measured(tmp_path):
    torch.manual_seed(0)
    ICLPolicy(ICLPolicyConfig(obs_dim=39, act_dim=4, d_model=16, n_layer=1, n_head=2, max_episode_length=167,
                              max_context_episodes=2, context_stride=10, context_keep_best=True,
                              action_repeat=3)).save_pretrained(tmp_path / "agent")
    assert keep_check.main([str(tmp_path / "agent"), "--envs", "reach-v3", "--tasks-per-env", "1", "-K", "1", "-E", "1",
                            "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "keep_check.json").read_text())
    (row,) = result["trials"]
    assert row["env"] == "reach-v3" and 0.0 <= row["kept"] <= 1.0
    distances = [row[k] for k in row if k.endswith("_cm")]
    assert all(np.isfinite(d) and d >= 0 for d in distances)
    # the best step lies on the adaptation episode's path, so that path came at least as close to the goal
    assert row["adapt_closest_to_goal_cm"] <= row["best_to_goal_cm"] + 1e-9
    assert "| reach-v3 |" in (tmp_path / "out" / "keep_check.md").read_text()


def test_an_expert_context_is_played_by_the_expert_and_read_by_the_agent(tmp_path, capsys):
    """--context expert: the scripted expert (told the goal) plays the adaptation episode and reaches the goal; the
    agent, primed with it, plays the evaluation episode from its first step (an untrained agent does not reach)."""
    torch.manual_seed(0)
    ICLPolicy(ICLPolicyConfig(obs_dim=39, act_dim=4, d_model=16, n_layer=1, n_head=2, max_episode_length=167,
                              max_context_episodes=2, context_stride=10, action_repeat=3)).save_pretrained(tmp_path / "a")
    args = [str(tmp_path / "a"), "--envs", "reach-v3", "--tasks-per-env", "1", "-K", "1", "-E", "1"]
    assert keep_check.main(args + ["--context", "expert", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "keep_check.json").read_text())
    (row,) = result["trials"]
    assert result["context"] == "expert" and row["found"]
    assert row["adapt_closest_to_goal_cm"] < 2.0 and row["eval_closest_to_goal_cm"] > 5.0
    assert "scripted expert" in (tmp_path / "out" / "keep_check.md").read_text()
    for bad, message in ((["--context", "teacher"], "teacher"), (["--context", "expert", "--wiped"], "--wiped")):
        assert keep_check.main(args + bad + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_the_top_steps_centroid_averages_every_step_at_the_top_reward():
    """Two decisions tie at the top reward: the centroid is the mean of where each led (the next step's position),
    and a lower reward anywhere does not count."""
    pos = np.zeros((2, 4, 3))
    pos[0, 2] = [1.0, 0.0, 0.0]  # where episode 0's decision 1 led
    pos[1, 3] = [0.0, 1.0, 0.0]  # episode 1's decision 3 is its last: its own position counts
    reward = np.full((2, 4), 5.0)
    reward[0, 1] = reward[1, 3] = 30.0
    reward[1, 0] = 29.97
    centre, n = keep_check.top_centroid(pos, reward)
    assert n == 2 and np.allclose(centre, [0.5, 0.5, 0.0])
