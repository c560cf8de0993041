"""Training windows over histories: a number of consecutive whole episodes of one trial, both targets.

``WindowDataset`` maps a window index to a dict of tensors (map-style, so DataLoader workers are safe);
``WindowSampler`` orders the windows for one data-parallel rank: seeded, disjoint across ranks, and
resumable from the number of windows consumed. Not for: generating histories or batching into tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from icl_metarl.harness.errors import UsageError
from icl_metarl.incontext.shards import Histories, load_histories


class WindowDataset(Dataset):
    """Every window of ``episodes_per_window`` consecutive whole episodes in one or more histories dirs.

    Windows start at episode boundaries only; a trial of K episodes gives K - E + 1 windows. Items are
    dicts with W = E * episode_length: obs (W, 39), actions (W, 4) taken (AD-eps target), expert_actions
    (W, 4) (DPT target), rewards (W,), successes (W,) float32, episode_start (W,) bool, step_in_episode
    (W,) int64, and scalars window, trial, task (ids over all dirs; ``tasks[task]`` is its TaskSpec),
    first_episode (episode index in the trial of the window's first episode).
    """

    def __init__(self, dirs: str | Path | Sequence[str | Path], episodes_per_window: int,
                 splits: Sequence[str] = ("train",), verify: bool = True, from_trial_start: bool = False):
        dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
        if not dirs:
            raise UsageError("no histories directories given")
        if not isinstance(episodes_per_window, (int, np.integer)) or episodes_per_window < 1:
            raise UsageError(f"episodes_per_window must be a positive integer, got {episodes_per_window!r}")
        self.sources: list[Histories] = [load_histories(d, verify=verify) for d in dirs]
        first = self.sources[0]
        for h in self.sources:
            s = h.manifest["settings"]
            if s["split"] not in splits:
                raise UsageError(f"{h.path} holds {s['split']!r}-split histories; valid here: {', '.join(splits)}")
            for key in ("obs_dim", "act_dim"):
                if h.manifest[key] != first.manifest[key]:
                    raise UsageError(f"{h.path} has {key}={h.manifest[key]}, {first.path} has {first.manifest[key]}")
            for key in ("episode_length", "action_repeat"):
                if getattr(h, key) != getattr(first, key):
                    raise UsageError(f"{h.path} has {key}={getattr(h, key)}, {first.path} has "
                                     f"{getattr(first, key)}; windows need one episode length and decision interval")
        self.episode_length = first.decisions  # stored steps (decisions) per episode
        self.action_repeat = first.action_repeat
        self.simulator_episode_length = first.episode_length
        self.episodes_per_window = int(episodes_per_window)
        self.window_length = self.episodes_per_window * self.episode_length
        self.tasks, task_maps = _merge_tasks(self.sources)
        self._index = _window_index(self.sources, task_maps, self.episodes_per_window, self.episode_length)
        if from_trial_start:  # the compact context: a window is the start of a trial, as acting sees it
            starts = self._index["first_episode"] == 0
            self._index = {k: v[starts] for k, v in self._index.items()}
        if len(self) == 0:
            raise UsageError(f"no trial has {episodes_per_window} episodes; episodes_per_window must be at most "
                             f"the episodes per trial of the data")

    def __len__(self) -> int:
        return int(self._index["offset"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range 0..{len(self) - 1}")
        shard = self.sources[self._index["source"][i]].shards[self._index["shard"][i]]
        rows = slice(int(self._index["offset"][i]), int(self._index["offset"][i]) + self.window_length)
        step = torch.from_numpy(np.asarray(shard["step"][rows], dtype=np.int64))  # (W,)
        as_f32 = lambda name: torch.from_numpy(np.array(shard[name][rows], dtype=np.float32))  # noqa: E731
        return {
            "obs": as_f32("obs"),  # (W, 39)
            "actions": as_f32("actions"),  # (W, 4)
            "expert_actions": as_f32("expert_actions"),  # (W, 4)
            "rewards": as_f32("rewards"),  # (W,)
            "successes": as_f32("successes"),  # (W,)
            "episode_start": step == 0,  # (W,)
            "step_in_episode": step,  # (W,)
            "window": torch.tensor(i),
            "trial": torch.tensor(int(self._index["trial"][i])),
            "task": torch.tensor(int(self._index["task"][i])),
            "first_episode": torch.tensor(int(self._index["first_episode"][i])),
        }


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Windows (dicts of (W, ...) tensors) stacked into one batch of (B, W, ...) tensors."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _merge_tasks(sources: list[Histories]) -> tuple[list, list[np.ndarray]]:
    """One task list over all dirs (equal tasks merged) and, per dir, its task index -> merged index."""
    merged, ids, maps = [], {}, []
    for h in sources:
        local = []
        for t in h.tasks:
            key = (t.env_name, t.rand_vec)
            if key not in ids:
                ids[key] = len(merged)
                merged.append(t)
            local.append(ids[key])
        maps.append(np.asarray(local, dtype=np.int64))
    return merged, maps


def _window_index(sources: list[Histories], task_maps: list[np.ndarray], E: int, L: int) -> dict[str, np.ndarray]:
    """Where every window starts, found from the stored episode/step columns (not from the settings)."""
    parts = []
    trial_base = 0
    for src, h in enumerate(sources):
        for sh, shard in enumerate(h.shards):
            step = np.asarray(shard["step"])
            episode = np.asarray(shard["episode"])
            starts = np.flatnonzero(step == 0)  # first row of every episode
            lengths = np.diff(np.append(starts, step.shape[0]))
            trial_of = np.cumsum(episode[starts] == 0) - 1  # trial (in shard) of every episode
            n = starts.shape[0] - E + 1
            if n <= 0:
                trial_base += int(shard["trial_task"].shape[0])
                continue
            # A window of episodes i .. i+E-1 is valid if they are all in one trial and all whole.
            same_trial = trial_of[: n] == trial_of[E - 1:]
            whole = np.lib.stride_tricks.sliding_window_view(lengths == L, E).all(axis=1)
            ok = np.flatnonzero(same_trial & whole)
            trial_task = task_maps[src][np.asarray(shard["trial_task"], dtype=np.int64)]
            parts.append({
                "source": np.full(ok.shape, src, np.int64),
                "shard": np.full(ok.shape, sh, np.int64),
                "offset": starts[ok].astype(np.int64),
                "trial": trial_base + trial_of[ok],
                "task": trial_task[trial_of[ok]],
                "first_episode": episode[starts[ok]].astype(np.int64),
            })
            trial_base += int(shard["trial_task"].shape[0])
    keys = ("source", "shard", "offset", "trial", "task", "first_episode")
    return {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int64) for k in keys}


class WindowSampler(Sampler[int]):
    """Window indices for one rank of ``world_size``: an endless stream of seeded epochs, strided by rank.

    The global stream is epoch 0's permutation, then epoch 1's, ...; rank r takes stream positions
    r, r + world_size, ... so within an epoch every window goes to exactly one rank. Resume with
    ``load_state_dict(state_dict(consumed))``, where ``consumed`` is the number of windows this rank's
    training loop actually used (not what a DataLoader prefetched); the world size may change between.
    """

    def __init__(self, num_windows: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, epochs: int | None = None):
        if num_windows < 1:
            raise UsageError(f"num_windows must be >= 1, got {num_windows}")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank must be in 0..world_size-1 = 0..{world_size - 1}, got {rank}")
        self.num_windows, self.seed, self.rank, self.world_size = int(num_windows), int(seed), int(rank), int(world_size)
        self.shuffle, self.epochs = shuffle, epochs
        self.start = 0  # global stream position this rank's iteration starts from (same on every rank)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def window_at(self, position: int) -> int:
        """The window at ``position`` of the global stream (the same on every rank)."""
        return int(self._epoch_order(position // self.num_windows)[position % self.num_windows])

    def __iter__(self) -> Iterator[int]:
        end = None if self.epochs is None else self.epochs * self.num_windows
        pos = self.start + self.rank
        epoch, order = -1, None
        while end is None or pos < end:
            if pos // self.num_windows != epoch:
                epoch = pos // self.num_windows
                order = self._epoch_order(epoch)
            yield int(order[pos % self.num_windows])
            pos += self.world_size

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless WindowSampler has no length; give epochs=N for a finite one")
        remaining = self.epochs * self.num_windows - self.start - self.rank
        return max(0, -(-remaining // self.world_size))

    def state_dict(self, consumed: int) -> dict:
        """Where to resume after this rank's loop used ``consumed`` windows (every rank used as many)."""
        return {"global_position": self.start + int(consumed) * self.world_size, "seed": self.seed,
                "num_windows": self.num_windows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_windows", "shuffle"):
            if state[key] != getattr(self, key):
                raise UsageError(f"sampler state was saved with {key}={state[key]!r}, this sampler has "
                                 f"{getattr(self, key)!r}; resume with the same data and seed")
        self.start = int(state["global_position"])
