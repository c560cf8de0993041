"""The in-context agent: an ``ICLPolicy`` stepping a batch of parallel trials with a KV cache.

One new token per step per trial; the context persists across the episodes of a trial and is wiped by
``start_trials`` (or every episode, for the non-adaptive baseline); ``prime`` puts a given context into a
fresh window (probes replay an episode after an altered context). Not for: training, evaluation loops.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from icl_metarl.harness.agent import Agent
from icl_metarl.harness.budget import run_budget
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.threads import threads_held
from icl_metarl.incontext.attention import kept_offsets
from icl_metarl.incontext.config import EXPLORE_KINDS
from icl_metarl.incontext.model import ICLPolicy
from icl_metarl.incontext.tokens import episode_inputs

TRAINING_INFO = "training.json"


class InContextAgent(Agent):
    """Acts with an in-context policy; the window holds whole episodes, at most ``max_context_episodes``.

    When a new episode would not fit, the oldest episode is dropped at the boundary and the remaining
    window is re-encoded once into a fresh cache: the model always sees a context that starts at an
    episode start with positions from 0, as in training. ``use_cache=False`` recomputes the whole
    window every step (same actions, for checking and benchmarking only). ``deterministic=None`` samples
    from a tanh-Gaussian head and takes the action of a deterministic one. ``cpu_threads`` caps torch's
    threads during the agent's CPU forwards (None: leave torch's setting): a one-token step is too
    small to split, and on a busy machine threads spin against each other and the environments
    (docs/benchmarks.md).

    A compact-context model (``context_stride`` >= 1) keeps the whole trial instead: when an episode ends,
    its KV-cache entries but those of its kept steps are dropped (``KVCache.keep``, no re-encoding), so
    each step attends to the kept tokens of every earlier episode and the current episode in full, as in
    training; ``use_cache=False`` recomputes the whole trial under the compact mask (same actions). A
    trial longer than ``max_context_episodes`` episodes is refused: the cache is sized for that many.

    Exploration (``explore_episodes``, ``explore_scale``; None: the model config's acting defaults): in
    the first ``explore_episodes`` episodes of a trial the agent adds a constant offset, drawn once per
    trial and episode from N(0, explore_scale^2) per action dimension, to every action (then clips to
    [-1, 1]); the context records the action actually taken. A posterior-mean policy otherwise repeats
    the same path every episode and its context never tells it more; the later episodes exploit what the
    exploratory ones found. The wiped-context variant explores in the same episodes of a trial.
    ``explore_kind="step"`` perturbs every decision instead: the pre-squash action plus fresh N(0,
    explore_scale^2) noise, as a Gaussian policy samples, so each exploring episode is a different path.
    """

    def __init__(
        self,
        model: ICLPolicy,
        deterministic: bool | None = None,
        wipe_context_each_episode: bool = False,
        device: str | torch.device = "cpu",
        use_cache: bool = True,
        cpu_threads: int | None = 1,
        explore_episodes: int | None = None,
        explore_scale: float | None = None,
        explore_kind: str | None = None,
    ):
        if deterministic is None:
            # A policy trained to model a distribution acts by sampling it (posterior-sampling-like
            # exploration, as DPT does); a deterministic head has nothing to sample.
            deterministic = model.config.action_head != "tanh_gaussian"
        if not deterministic and model.config.action_head != "tanh_gaussian":
            raise UsageError(
                f"deterministic=False needs action_head 'tanh_gaussian', the model has {model.config.action_head!r}"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.deterministic = deterministic
        self.wipe_context_each_episode = wipe_context_each_episode
        self.use_cache = use_cache
        if cpu_threads is not None and (not isinstance(cpu_threads, (int, np.integer)) or cpu_threads < 1):
            raise UsageError(f"cpu_threads must be a positive integer or None, got {cpu_threads!r}")
        self.cpu_threads = cpu_threads
        c = model.config
        # getattr: a config object built before these fields existed has none (from_pretrained fills them)
        self.explore_episodes = int(getattr(c, "explore_episodes", 0) if explore_episodes is None else explore_episodes)
        self.explore_scale = float(getattr(c, "explore_scale", 0.0) if explore_scale is None else explore_scale)
        if self.explore_episodes < 0 or not self.explore_scale >= 0.0:
            raise UsageError(f"explore_episodes must be >= 0 and explore_scale >= 0, got "
                             f"{self.explore_episodes} and {self.explore_scale}")
        self.explore_kind = getattr(c, "explore_kind", "offset") if explore_kind is None else explore_kind
        if self.explore_kind not in EXPLORE_KINDS:
            raise UsageError(f"explore_kind {self.explore_kind!r}: allowed {', '.join(EXPLORE_KINDS)}")
        self.checkpoint: str | None = None
        self.action_repeat = int(getattr(c, "action_repeat", 1))  # the decision interval it was trained at
        self.name = "icl-wiped" if wipe_context_each_episode else "icl"
        self._warned_window = False
        self._num_trials = 0

    @classmethod
    def from_pretrained(cls, path, context_stride: int | None = None, **kwargs) -> "InContextAgent":
        """An agent over the checkpoint directory ``path`` (config.json + model.safetensors);
        ``context_stride``: the context form asked for, refused unless it is the trained one."""
        model = ICLPolicy.from_pretrained(path)
        trained = model.config.context_stride
        if context_stride is not None and context_stride != trained:
            form = lambda s: "the full context" if s == 0 else f"the compact context of stride {s}"  # noqa: E731
            raise UsageError(f"--context-stride {context_stride}: {path} was trained with {form(trained)}; "
                             f"it acts only with that (--context-stride {trained}, or leave the flag out)")
        agent = cls(model, **kwargs)
        agent.checkpoint = str(path)
        return agent

    # ----------------------------------------------------------------------------- protocol
    def start_trials(self, num_trials: int, seed: int) -> None:
        if not isinstance(num_trials, (int, np.integer)) or num_trials < 1:
            raise UsageError(f"num_trials must be a positive integer, got {num_trials!r}")
        c, b, dev = self.model.config, int(num_trials), self.device
        # the tokens kept for re-encoding (full context) or for recomputing the trial (compact)
        n = c.max_context_episodes * c.max_episode_length if c.compact else c.max_positions
        self._num_trials = b
        # The window's tokens, kept to re-encode it when the oldest episode is dropped.
        self._obs = torch.zeros(b, n, c.obs_dim, device=dev)
        self._prev_actions = torch.zeros(b, n, c.act_dim, device=dev)
        self._prev_rewards = torch.zeros(b, n, device=dev)
        self._episode_start = torch.zeros(b, n, dtype=torch.bool, device=dev)
        self._step = torch.zeros(b, n, dtype=torch.long, device=dev)
        self._length = 0  # tokens in the window
        self._episodes: list[int] = []  # lengths of the finished episodes in the window, oldest first
        self._t = 0  # step in the current episode
        self._episode_index = 0  # episodes of the trial played so far (wiping the context does not reset it)
        self._offset = torch.zeros(b, c.act_dim, device=dev)  # this episode's exploration offset
        self._cache = self.model.new_cache(b, device=dev) if self.use_cache else None
        self._plan = self.model.decode_plan() if self.use_cache else None  # the weights as they are now
        self._last_action = torch.zeros(b, c.act_dim, device=dev)
        self._last_reward = torch.zeros(b, device=dev)
        self._awaiting_observe = False
        self._generator = torch.Generator(device=dev).manual_seed(int(seed))

    def prime(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, episode_index: int,
              random_state: torch.Tensor | None = None) -> None:
        """Start the trials just started (``start_trials``, nothing played yet) with K whole episodes of T
        steps already in the window, as if they had been played: obs (B,K,T,obs_dim), the actions taken
        (B,K,T,A), rewards (B,K,T); K = 0 is an empty context.

        The next episode is then played by the same code as in a real trial, which is what a probe
        needs to replay an episode with the context altered. ``episode_index``: how many episodes of
        the trial came before the next one (at least K), which decides whether it explores, so a
        context with episodes removed still counts them. ``random_state`` (from ``random_state()``
        taken at the same point of a real trial): the next episode draws the same exploration offset
        and action noise as that trial did; None keeps the ``start_trials`` seed's state.
        """
        with self._threads(), torch.inference_mode():
            self._prime(obs, actions, rewards, episode_index, random_state)

    def _prime(self, obs, actions, rewards, episode_index, random_state) -> None:
        c, b = self.model.config, self._num_trials
        if b == 0 or self._length or self._t or self._episode_index:
            raise UsageError("prime must come right after start_trials, before any step")
        obs, actions, rewards = np.asarray(obs), np.asarray(actions), np.asarray(rewards)
        if rewards.ndim != 3 or rewards.shape[0] != b:
            raise UsageError(f"rewards of shape {rewards.shape}; expected ({b}, episodes, steps)")
        k, t = rewards.shape[1:]
        if obs.shape != (b, k, t, c.obs_dim) or actions.shape != (b, k, t, c.act_dim):
            raise UsageError(f"obs {obs.shape} and actions {actions.shape} do not match rewards {rewards.shape} "
                             f"(obs_dim {c.obs_dim}, act_dim {c.act_dim})")
        if k > c.max_context_episodes or (k and not 1 <= t <= c.max_episode_length):
            raise UsageError(f"a context of {k} episodes of {t} steps does not fit the model's window of "
                             f"{c.max_context_episodes} episodes of at most {c.max_episode_length} steps")
        if not isinstance(episode_index, (int, np.integer)) or episode_index < k:
            raise UsageError(f"episode_index must be an integer >= the {k} context episodes, got {episode_index!r}")
        n = k * t
        tokens = episode_inputs(obs, actions, rewards, self.device)  # each (B, K*T, ...)
        self._obs[:, :n], self._episode_start[:, :n], self._step[:, :n] = (
            tokens["obs"], tokens["episode_start"], tokens["step_in_episode"])
        self._prev_actions[:, :n], self._prev_rewards[:, :n] = tokens["prev_actions"], tokens["prev_rewards"]
        self._length, self._episodes, self._episode_index = n, [t] * k, int(episode_index)
        if random_state is not None:
            self._generator.set_state(random_state)
        if self._cache is not None and n and c.compact:  # episode by episode, each then compacted
            for e in range(k):
                self._forward(e * t, (e + 1) * t, self._cache, episode=e)
                self._keep_episode(e * t, t)
        elif self._cache is not None and n:
            self._forward(0, n, self._cache)  # encoded once, as a re-encoded window is

    def random_state(self) -> torch.Tensor:
        """The trials' random generator state (exploration offsets, sampled actions), for ``prime``."""
        return self._generator.get_state()

    @property
    def _exploring(self) -> bool:
        """Whether the current episode of the trial is one of the exploring ones."""
        return self._episode_index < self.explore_episodes and self.explore_scale > 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        with self._threads(), torch.inference_mode():
            return self._act(obs)

    def _act(self, obs: np.ndarray) -> np.ndarray:
        c = self.model.config
        if self._num_trials == 0:
            raise UsageError("act called before start_trials")
        obs = np.asarray(obs)
        if obs.shape != (self._num_trials, c.obs_dim):
            raise UsageError(f"observations of shape {obs.shape}; expected ({self._num_trials}, {c.obs_dim})")
        if self._awaiting_observe:
            raise UsageError("act called twice without observe in between")
        if self._t >= c.max_episode_length:
            raise UsageError(
                f"episode longer than the model's max_episode_length {c.max_episode_length}; end_episode was not called"
            )
        if self._t == 0:
            self._make_room_for_episode()
            offset = self._exploring and self.explore_kind == "offset"
            self._offset = (self.explore_scale * torch.randn(self._offset.shape, generator=self._generator,
                                                            device=self.device)) if offset else torch.zeros_like(self._offset)

        i = self._length
        self._obs[:, i] = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        first = self._t == 0
        self._prev_actions[:, i] = 0.0 if first else self._last_action
        self._prev_rewards[:, i] = 0.0 if first else self._last_reward
        self._episode_start[:, i] = first
        self._step[:, i] = self._t
        self._length += 1
        self._t += 1

        if self.use_cache:  # the hot path: one token, no module dispatch (model.decode_step)
            mean, log_std = self.model.decode_step(self._obs[:, i], self._prev_actions[:, i], self._prev_rewards[:, i],
                                                   first, self._t - 1, self._cache, self._plan,
                                                   position=len(self._episodes) if c.compact else None)
        else:
            out = self._forward(0, i + 1, None)
            mean, log_std = out.mean[:, -1], None if out.log_std is None else out.log_std[:, -1]
        mean = mean.float()
        if self._exploring and self.explore_kind == "step":
            # a fresh Gaussian perturbation of the pre-squash action at every decision, as a Gaussian policy
            # (maml-imitate's) samples
            mean = mean + self.explore_scale * torch.randn(mean.shape, generator=self._generator, device=self.device)
        if self.deterministic:
            action = torch.tanh(mean)
        else:
            noise = torch.randn(mean.shape, generator=self._generator, device=self.device)
            action = torch.tanh(mean + log_std.float().exp() * noise)
        if self._exploring and self.explore_kind == "offset":
            action = (action + self._offset).clamp(-1.0, 1.0)
        self._last_action = action
        self._awaiting_observe = True
        return action.cpu().numpy().astype(np.float32)

    def observe(self, reward: np.ndarray, success: np.ndarray) -> None:
        reward = np.asarray(reward, dtype=np.float32)
        if reward.shape != (self._num_trials,):
            raise UsageError(f"rewards of shape {reward.shape}; expected ({self._num_trials},)")
        self._last_reward = torch.as_tensor(reward, device=self.device)
        self._awaiting_observe = False

    def end_episode(self) -> None:
        c = self.model.config
        if self._t > 0:
            if c.compact and self._cache is not None and not self.wipe_context_each_episode:
                self._keep_episode(self._length - self._t, self._t)
            self._episodes.append(self._t)
            self._episode_index += 1
        self._t = 0
        self._awaiting_observe = False

    def describe(self) -> dict:
        c = self.model.config
        out = {
            "name": self.name,
            "type": type(self).__name__,
            "checkpoint": self.checkpoint,
            "deterministic": self.deterministic,
            "wipe_context_each_episode": self.wipe_context_each_episode,
            "explore_episodes": self.explore_episodes,
            "explore_scale": self.explore_scale,
            "explore_kind": self.explore_kind,
            "model": {
                "parameters": sum(p.numel() for p in self.model.parameters()),
                **{k: getattr(c, k) for k in ("d_model", "n_layer", "n_head", "max_episode_length",
                                              "max_context_episodes", "action_head", "reward_scale",
                                              "context_stride", "context_keep_best", "context_best_steps",
                                              "trained_episodes", "action_repeat")},
                "attn_implementation": self.model.attn_implementation,
            },
        }
        if self.checkpoint is not None:
            info = Path(self.checkpoint) / TRAINING_INFO
            if info.is_file():
                try:
                    out["training"] = json.loads(info.read_text())
                except json.JSONDecodeError as e:
                    raise UsageError(f"{info} is not valid JSON: {e}") from None
                if "task_pool" in out["training"]:  # the report's "trained on" column
                    out["task_pool"] = out["training"]["task_pool"]
            budget = run_budget(self.checkpoint)  # the report's budget columns (a phase's: the run's so far)
            if budget is not None:
                out["budget"] = budget
        return out

    # ------------------------------------------------------------------------------- window
    def _threads(self):
        """``cpu_threads`` held for one step of CPU forwards (an acting option, put back after the step)."""
        return threads_held(self.cpu_threads if self.device.type == "cpu" else None)

    def _forward(self, start: int, end: int, cache, episode: int | None = None):
        """The model on the kept tokens start..end (``episode``: their one episode index, compact context
        with a cache; None: counted from their episode starts)."""
        index = None if episode is None else torch.full((self._num_trials, end - start), episode, device=self.device)
        return self.model(
            self._obs[:, start:end],
            self._prev_actions[:, start:end],
            self._prev_rewards[:, start:end],
            self._episode_start[:, start:end],
            self._step[:, start:end],
            past_key_values=cache,
            use_cache=cache is not None,
            episode_index=index,
        )

    def _keep_episode(self, start: int, t: int) -> None:
        """Compact context: drop from the cache all but the kept steps of the episode just encoded, whose
        ``t`` tokens sit at ``start`` in the window (``attention.kept_offsets``: the strided steps, the
        last, and each row's best-rewarded steps if the model keeps them)."""
        c = self.model.config
        offsets = kept_offsets(self._prev_rewards[:, start:start + t], c.context_stride, c.kept_best)
        self._cache.keep(self._cache.length - t, offsets)

    def _make_room_for_episode(self) -> None:
        """At an episode boundary: wipe, or drop the oldest episode and re-encode, if the window is full."""
        c = self.model.config
        if self.wipe_context_each_episode:
            self._episodes, self._length = [], 0
        elif c.compact:
            if len(self._episodes) >= c.max_context_episodes:
                raise UsageError(f"a trial of more than {c.max_context_episodes} episodes: the compact context holds "
                                 f"max_context_episodes={c.max_context_episodes} (play fewer, or train with more)")
            return  # the finished episode was compacted at its end
        elif len(self._episodes) >= self.model.config.max_context_episodes:
            if not self._warned_window:
                self._warned_window = True
                warnings.warn(
                    f"trials are longer than the trained context ({self.model.config.max_context_episodes} "
                    f"episodes): at each episode boundary the oldest episode is dropped and the window re-encoded",
                    stacklevel=4,  # the caller of act
                )
            drop = self._episodes.pop(0)
            keep = self._length - drop
            for buf in (self._obs, self._prev_actions, self._prev_rewards, self._episode_start, self._step):
                buf[:, :keep] = buf[:, drop : self._length].clone()
            self._length = keep
        else:
            return
        if self._cache is not None:
            self._cache.reset()
            if self._length > 0:
                self._forward(0, self._length, self._cache)  # re-encode the kept episodes once


def load_agent(path, adaptive: bool = True, **options) -> InContextAgent:
    """The agent of an in-context checkpoint (the learner registry's loader); ``adaptive=False`` wipes
    its context every episode. ``options``: ``InContextAgentOptions`` fields (exploration, threads)."""
    return InContextAgent.from_pretrained(path, wipe_context_each_episode=not adaptive, **options)

