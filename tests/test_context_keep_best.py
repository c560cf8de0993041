"""The compact context that also keeps each earlier episode's best-rewarded step (``context_keep_best``).

The kept step differs by row (it is chosen from each trial's own rewards), so the cache is compacted row by
row and the training mask is one per row: compared, as the plain compact context is, three ways (cached
acting, full recomputation, the training forward) and against hand-made cases.
"""

import json

import numpy as np
import pytest
import torch
from test_compact_context import (  # the same trials and paths
    B,
    K,
    L,
    assert_primed_equals_played,
    cache_lengths,
    play,
    training_forward,
    trial,
)

from icl_metarl.harness.errors import UsageError
from icl_metarl.incontext.agent import InContextAgent
from icl_metarl.incontext.attention import best_candidates, best_steps, compact_mask, kept_offsets, kept_steps
from icl_metarl.incontext.model import ICLPolicy, ICLPolicyConfig


def tiny(n_layer=2, **kw) -> ICLPolicy:
    torch.manual_seed(0)
    kw = {"context_keep_best": True, **kw}
    cfg = ICLPolicyConfig(obs_dim=5, act_dim=2, d_model=16, n_layer=n_layer, n_head=2, max_episode_length=L,
                          max_context_episodes=4, context_stride=3, **kw)
    return ICLPolicy(cfg).eval()


def best_token(rewards: np.ndarray, e: int) -> np.ndarray:
    """(B,) the step of episode ``e`` each row keeps as its best: its token reads reward t - 1."""
    prev = np.concatenate([np.zeros((B, 1), np.float32), rewards[:, e, :-1]], axis=1)
    return best_steps(torch.as_tensor(prev), 3)[:, 0].numpy()


def test_best_step_by_hand():
    # 7 steps, stride 3: steps 2, 5 (strided) and 6 (last) are kept anyway, step 0 reads no reward
    r = torch.tensor([[9.0, 1.0, 8.0, 0.0, 3.0, 8.0, 9.0],
                      [9.0, 2.0, 0.0, 2.0, 1.0, 0.0, 0.0]])
    assert best_steps(r, 3).tolist() == [[4], [1]]  # the highest among steps 1, 3, 4; the first on ties
    assert kept_offsets(r, 3, keep_best=1).tolist() == [[2, 4, 5, 6], [1, 2, 5, 6]]
    assert kept_offsets(r, 3, keep_best=0).tolist() == [kept_steps(7, 3)] * 2
    assert best_steps(r, 1) is None  # every step kept: nothing to add
    assert best_steps(r, 3, 0) is None
    assert best_steps(r, 3, 2).tolist() == [[1, 4], [1, 3]]  # the two highest, in time order
    assert best_steps(r, 3, 5).tolist() == [[1, 3, 4], [1, 3, 4]]  # only three candidates


def test_best_steps_spread_over_ties_at_the_top():
    """A flat top (reward 10 everywhere inside a success region): the kept steps span the tied run, first to last."""
    inside = torch.tensor([[0.0, 1.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 2.0, 0.0]])  # stride 100: all candidates
    assert best_steps(inside, 100, 1).tolist() == [[2]]  # the first, as a single best step always was
    assert best_steps(inside, 100, 2).tolist() == [[2, 8]]
    assert best_steps(inside, 100, 3).tolist() == [[2, 5, 8]]
    assert best_steps(inside, 100, 4).tolist() == [[2, 4, 6, 8]]  # ranks 0, 2, 4, 6 of 7 tied steps
    assert best_steps(inside, 100, 7).tolist() == [[2, 3, 4, 5, 6, 7, 8]]
    assert best_steps(inside, 100, 8).tolist() == [[2, 3, 4, 5, 6, 7, 8, 9]]  # all tied ones, then the next best
    # six tied steps: ranks round(j * 5 / (count - 1)), halves rounded up (2.5 -> 3, 1.67 -> 2, 3.33 -> 3)
    six = torch.tensor([[0.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 0.0]])
    assert best_steps(six, 100, 3).tolist() == [[1, 4, 6]]
    assert best_steps(six, 100, 4).tolist() == [[1, 3, 4, 6]]
    # a strict best is always kept; the rest spread over the ties below it
    peak = torch.tensor([[0.0, 5.0, 5.0, 5.0, 9.0, 5.0, 5.0, 0.0]])
    assert best_steps(peak, 100, 1).tolist() == [[4]]
    assert best_steps(peak, 100, 3).tolist() == [[1, 4, 6]]
    # rows pick independently, and leading dimensions pass through
    both = torch.stack([inside[0, :8], peak[0]])
    assert best_steps(both, 100, 3).tolist() == [[2, 4, 6], [1, 4, 6]]
    assert best_steps(both[None], 100, 3).shape == (1, 2, 3)


@pytest.mark.parametrize("length,stride", [(1, 1), (2, 2), (3, 3), (7, 1), (7, 3), (10, 10), (11, 10), (167, 10)])
def test_the_cache_size_counts_what_the_cache_keeps(length, stride):
    """``kept_per_episode`` (the cache's size) and ``kept_offsets`` (what it keeps) read one candidate rule: step 0,
    the kept steps and the candidates cover an episode once each, and a row keeps as many tokens as sized."""
    kept, extra = kept_steps(length, stride), best_candidates(length, stride)
    assert sorted(set(kept) | set(extra) | {0}) == list(range(length))
    assert not set(kept) & set(extra) and 0 not in extra
    rewards = torch.rand(4, length)
    for keep_best, count in ((False, 1), (True, 1), (True, 4)):
        cfg = ICLPolicyConfig(obs_dim=5, act_dim=2, max_episode_length=length, context_stride=stride,
                              context_keep_best=keep_best, context_best_steps=count)
        offsets = kept_offsets(rewards, stride, cfg.kept_best)
        assert offsets.shape == (4, cfg.kept_per_episode)
        assert all(len(set(row)) == len(row) for row in offsets.tolist())  # no step kept twice


def test_the_mask_keeps_each_rows_best_step():
    ep = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    step = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    prev = torch.tensor([[0.0, 5.0, 9.0, 1.0, 0.0, 0.0, 0.0],
                         [0.0, 1.0, 0.0, 7.0, 0.0, 0.0, 0.0]])
    m = compact_mask(ep, step, 3, prev).int()  # stride 3 keeps step 2 and the last (4); the best of 1 and 3 too
    assert m.shape == (2, 7, 7)
    assert m[0, 5].tolist() == [0, 1, 1, 0, 1, 1, 0]  # row 0 keeps step 1 (step 2's 9 is kept anyway)
    assert m[1, 5].tolist() == [0, 0, 1, 1, 1, 1, 0]  # row 1 keeps step 3
    plain = compact_mask(ep, step, 3).int()
    assert torch.equal(m[:, :5, :5], plain[None, :5, :5].expand(2, -1, -1))  # within an episode: as before


@pytest.mark.parametrize("count", [1, 2])
def test_cached_acting_equals_recomputation_and_the_training_forward(count):
    model = tiny(context_best_steps=count)
    obs, rewards = trial()
    assert (best_token(rewards, 0)[0] != best_token(rewards, 0)[1])  # the rows keep different steps
    cached = play(InContextAgent(model, use_cache=True), obs, rewards)
    np.testing.assert_allclose(cached, play(InContextAgent(model, use_cache=False), obs, rewards), atol=1e-5)
    np.testing.assert_allclose(cached, training_forward(model, obs, cached, rewards), atol=1e-5)


@pytest.mark.parametrize("count", [1, 2])
def test_the_cache_holds_count_more_tokens_per_earlier_episode(count):
    model = tiny(context_best_steps=count)
    e, t = np.indices((K, L))
    np.testing.assert_array_equal(cache_lengths(model), e * (len(kept_steps(L, 3)) + count) + t + 1)
    assert model.config.max_positions == 3 * (len(kept_steps(L, 3)) + count) + L


def test_the_best_step_reaches_later_episodes_and_another_dropped_step_does_not():
    """One layer, actions held fixed: a later episode reads episode 0's kept tokens only, the best one included."""
    model = tiny(n_layer=1)
    obs, rewards = trial()
    actions = np.random.default_rng(2).uniform(-1, 1, (B, K, L, 2)).astype(np.float32)
    base = training_forward(model, obs, actions, rewards)
    best = best_token(rewards, 0)
    for row in range(B):
        moved = obs.copy()
        moved[row, 0, best[row]] += 5.0
        assert not np.allclose(training_forward(model, moved, actions, rewards)[row, 1:], base[row, 1:])
        other = next(s for s in range(1, L) if s not in kept_steps(L, 3) and s != best[row])
        dropped = obs.copy()
        dropped[row, 0, other] += 5.0
        np.testing.assert_allclose(training_forward(model, dropped, actions, rewards)[:, 1:], base[:, 1:], atol=1e-6)


def test_nothing_depends_on_a_later_step():
    model = tiny()
    obs, rewards = trial()
    base = play(InContextAgent(model), obs, rewards)
    later = rewards.copy()
    later[:, 1, 5] += 50.0  # episode 1's reward at step 5: read from step 6 on, and it may move episode 1's best
    out = play(InContextAgent(model), obs, later)
    np.testing.assert_array_equal(out[:, 0], base[:, 0])
    np.testing.assert_array_equal(out[:, 1, :6], base[:, 1, :6])
    assert not np.allclose(out[:, 2], base[:, 2])


def test_primed_context_equals_played_one_and_save_load_keeps_the_form(tmp_path):
    model = tiny()
    played = assert_primed_equals_played(model)
    obs, rewards = trial()
    model.save_pretrained(tmp_path)
    back = ICLPolicy.from_pretrained(tmp_path)
    assert back.config.context_keep_best is True
    np.testing.assert_array_equal(play(InContextAgent(back), obs, rewards), played)


def test_keep_best_without_the_compact_context_is_a_one_line_error():
    with pytest.raises(UsageError, match="context_keep_best needs the compact context"):
        ICLPolicyConfig(context_keep_best=True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match=f"context_best_steps must be an integer >= 1, got {bad!r}"):
            ICLPolicyConfig(context_stride=3, context_keep_best=True, context_best_steps=bad)


def test_a_checkpoint_saved_before_best_steps_existed_keeps_one(tmp_path):
    """Older keep-best checkpoints have no ``context_best_steps`` in config.json: they keep their single best step."""
    model = tiny()
    model.save_pretrained(tmp_path)
    cfg = tmp_path / "config.json"
    d = json.loads(cfg.read_text())
    del d["context_best_steps"]
    cfg.write_text(json.dumps(d))
    back = ICLPolicy.from_pretrained(tmp_path)
    assert (back.config.kept_best, back.config.kept_per_episode) == (1, len(kept_steps(L, 3)) + 1)
