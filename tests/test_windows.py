import os
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from icl_metarl.harness.errors import UsageError
from icl_metarl.incontext import shards
from icl_metarl.incontext.histories import GenerateConfig, generate
from icl_metarl.incontext.shards import load_histories
from icl_metarl.incontext.windows import WindowDataset, WindowSampler

# 5 trials of 4 episodes of 6 steps, 2 trials per shard (the last shard holds one).
CFG = GenerateConfig(suite="ML1:reach-v3", trials=5, episodes_per_trial=4, episode_length=6,
                     trials_per_shard=2, workers=1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    generate(CFG, root / "a", progress=False)
    generate(replace(CFG, trials=3, seed=1, task_pool="fresh"), root / "b", progress=False)
    generate(replace(CFG, trials=2, split="test"), root / "test", progress=False)
    return root


def test_windows_are_whole_episodes_of_one_trial(dirs):
    E, K, L = 2, 4, 6
    ds = WindowDataset(dirs / "a", episodes_per_window=E)
    assert len(ds) == 5 * (K - E + 1) and ds.window_length == E * L
    # Second way: the stored arrays reshaped (trial, episode, step), windows enumerated by hand.
    h = load_histories(dirs / "a")
    obs = np.concatenate([np.asarray(s["obs"]) for s in h.shards]).reshape(5, K, L, 39)
    expert = np.concatenate([np.asarray(s["expert_actions"]) for s in h.shards]).reshape(5, K, L, 4)
    tasks = np.concatenate([np.asarray(s["trial_task"]) for s in h.shards])
    expected = [(t, e) for t in range(5) for e in range(K - E + 1)]
    for i, (t, e) in enumerate(expected):
        w = ds[i]
        assert int(w["trial"]) == t and int(w["first_episode"]) == e
        assert torch.equal(w["obs"], torch.from_numpy(obs[t, e:e + E].reshape(E * L, 39)))
        assert torch.equal(w["expert_actions"], torch.from_numpy(expert[t, e:e + E].reshape(E * L, 4)))
        assert ds.tasks[int(w["task"])] == h.tasks[tasks[t]]
        assert w["episode_start"].tolist() == ([True] + [False] * (L - 1)) * E
        assert w["step_in_episode"].tolist() == list(range(L)) * E
        assert w["actions"].shape == (E * L, 4) and w["rewards"].dtype == torch.float32
        assert w["successes"].dtype == torch.float32 and w["step_in_episode"].dtype == torch.int64


def test_several_dirs_merge_and_splits_are_checked(dirs):
    ds = WindowDataset([dirs / "a", dirs / "b"], episodes_per_window=4)
    assert len(ds) == 5 + 3
    assert sorted({int(ds[i]["trial"]) for i in range(len(ds))}) == list(range(8))
    assert len(ds.tasks) == 50 + 3  # a: the 50 benchmark tasks; b: 3 fresh ones, merged after them
    assert sorted(int(ds[i]["task"]) for i in range(5, 8)) == [50, 51, 52]
    with pytest.raises(UsageError, match="'test'-split"):
        WindowDataset([dirs / "a", dirs / "test"], episodes_per_window=2)
    assert len(WindowDataset(dirs / "test", 2, splits=("test",))) == 2 * 3
    with pytest.raises(UsageError, match="episodes_per_window"):
        WindowDataset(dirs / "a", episodes_per_window=5)


def test_windows_read_memory_mapped_shards_and_hold_only_their_index(tmp_path):
    """The data stays on disk: every shard field is a read-only memory map, and building the dataset and
    reading windows allocates a small part of what the shards hold (tracemalloc counts numpy's buffers)."""
    generate(replace(CFG, trials=4, episodes_per_trial=2, episode_length=500, trials_per_shard=1), tmp_path / "big",
             progress=False)
    ds = WindowDataset(tmp_path / "big", 2, verify=False)
    arrays = [a for shard in ds.sources[0].shards for a in shard.values()]
    assert len(arrays) == 4 * 8 and all(isinstance(a, np.memmap) and not a.flags.writeable for a in arrays)
    data = sum(a.nbytes for a in arrays)  # 4,000 steps: about 790 kB
    tracemalloc.start()
    ds = WindowDataset(tmp_path / "big", 2, verify=False)
    windows = [ds[i] for i in range(len(ds))]  # 4 windows of 1,000 steps, copied out as tensors
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    held = sum(t.numel() * t.element_size() for w in windows for t in w.values())
    assert peak - held < data / 4, (peak, held, data)  # loaded into RAM instead: above data


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_open_files_stay_bounded_however_many_shards(tmp_path, monkeypatch):
    """Each memory map holds a file descriptor; a set of many shards must not hold one per field (8 per
    shard ran out of descriptors at about 128 shards). With room for 12 maps, 12 shards (96 fields) are
    loaded and every window read, and the windows equal those read with room for all of them."""
    generate(replace(CFG, trials=12, trials_per_shard=1), tmp_path / "many", progress=False)
    monkeypatch.setattr(shards._OPEN_MAPS, "limit", 1000)
    reference = [WindowDataset(tmp_path / "many", 2)[i] for i in range(36)]
    monkeypatch.setattr(shards, "_OPEN_MAPS", shards._MapCache(limit=12))
    before = _open_descriptors()
    ds = WindowDataset(tmp_path / "many", 2)
    windows = [ds[i] for i in range(len(ds))]
    assert len(ds.sources[0].shards) == 12 and len(windows) == 36
    assert _open_descriptors() - before <= 12
    for got, want in zip(windows, reference):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_shard_file_replaced_on_disk_is_mapped_again(tmp_path):
    generate(replace(CFG, trials=2), tmp_path / "h", progress=False)
    shard = load_histories(tmp_path / "h").shards[0]
    rewards = np.array(shard["rewards"])
    file = shard.directory / "rewards.npy"
    tmp = file.with_suffix(".tmp.npy")
    np.save(tmp, rewards + 1.0)
    os.replace(tmp, file)  # as a regenerated shard would be: a new file under the old name
    np.testing.assert_array_equal(np.asarray(shard["rewards"]), rewards + 1.0)


def test_sampler_is_deterministic_and_disjoint_across_ranks():
    n = 23
    one = list(WindowSampler(n, seed=3, epochs=2))
    assert one == list(WindowSampler(n, seed=3, epochs=2))
    assert one != list(WindowSampler(n, seed=4, epochs=2))
    assert sorted(one[:n]) == list(range(n)) and sorted(one[n:]) == list(range(n))
    ranks = [list(WindowSampler(n, seed=3, rank=r, world_size=3, epochs=1)) for r in range(3)]
    assert sorted(sum(ranks, [])) == list(range(n))  # no overlap, nothing missed
    assert [len(WindowSampler(n, seed=3, rank=r, world_size=3, epochs=1)) for r in range(3)] == [len(x) for x in ranks]
    # Rank streams interleave into the single-process stream.
    assert [ranks[p % 3][p // 3] for p in range(n)] == one[:n]


def test_sampler_resumes_exactly_even_with_another_world_size():
    n, consumed = 17, 11
    full = [list(WindowSampler(n, seed=0, rank=r, world_size=2, epochs=3)) for r in range(2)]
    resumed = []
    for r in range(2):
        s = WindowSampler(n, seed=0, rank=r, world_size=2, epochs=3)
        state = s.state_dict(consumed)
        again = WindowSampler(n, seed=0, rank=r, world_size=2, epochs=3)
        again.load_state_dict(state)
        resumed.append(list(again))
        assert resumed[r] == full[r][consumed:]
    # Going from 2 ranks to 1 continues the same global stream.
    single = WindowSampler(n, seed=0, epochs=3)
    single.load_state_dict(WindowSampler(n, seed=0, rank=0, world_size=2).state_dict(consumed))
    assert list(single) == list(WindowSampler(n, seed=0, epochs=3))[2 * consumed:]
    with pytest.raises(UsageError, match="seed"):
        WindowSampler(n, seed=1).load_state_dict(state)


def test_dataloader_batches(dirs):
    ds = WindowDataset(dirs / "a", episodes_per_window=3)
    loader = DataLoader(ds, batch_size=4, sampler=WindowSampler(len(ds), seed=0, epochs=1))
    batch = next(iter(loader))
    assert batch["obs"].shape == (4, 18, 39) and batch["actions"].shape == (4, 18, 4)
    assert batch["episode_start"].dtype == torch.bool and batch["trial"].shape == (4,)
