"""Playing one shard of trials through the harness's rollout loop and recording every step with the
expert's label: the agent that plays (the noisy expert, a policy, or a hand-over between the two) and
the recorder. Not for: writing shards or the manifest (``shards.py``, ``histories.py``).
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

from icl_metarl.harness.agent import Agent, Privileged
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.rollout import play_trials
from icl_metarl.harness.suites import ACT_DIM, OBS_DIM, decisions_per_episode, parse_goal_offsets
from icl_metarl.incontext.config import GenerateConfig
from icl_metarl.incontext.noise import NoisyExpertAgent


class HandoverAgent(Agent):
    """``first`` plays the first ``handover`` episodes of every trial, ``then`` the rest (relabelling's
    hand-over: a policy builds the context, the noisy expert finishes the trial). Both hear every
    episode's end, so each knows the trial's episode index; only the one playing observes its steps."""

    name = "handover"
    privileged = True  # ``then`` is told the goals; ``first`` is only ever shown the observations

    def __init__(self, first: Agent, then: Agent, handover: int):
        self.first, self.then, self.handover = first, then, handover
        self._episode = 0

    def start_trials(self, num_trials: int, seed: int) -> None:
        self.first.start_trials(num_trials, seed)
        self.then.start_trials(num_trials, seed)
        self._episode = 0

    def _playing(self) -> Agent:
        return self.first if self._episode < self.handover else self.then

    def act(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the hand-over agent acts only through act_privileged (its expert needs the goal)")

    def act_privileged(self, obs: np.ndarray, privileged: Privileged) -> np.ndarray:
        agent = self._playing()
        return agent.act_privileged(obs, privileged) if agent.privileged else agent.act(obs)

    def observe(self, reward: np.ndarray, success: np.ndarray) -> None:
        self._playing().observe(reward, success)

    def end_episode(self) -> None:
        self.first.end_episode()
        self.then.end_episode()
        self._episode += 1


class ShardRecorder:
    """The rollout loop's ``on_step`` for one shard: every step's observation, action taken, expert label
    (``label(env_names, obs, goals)``, the expert told the true goal; NaN in ``context_only`` episodes),
    reward and success."""

    def __init__(self, names: list[str], episodes: int, length: int, label, context_only: int = 0):
        T, K, L = len(names), episodes, length
        self.names, self.label, self.context_only = names, label, context_only
        self.obs = np.empty((T, K, L, OBS_DIM), np.float32)
        self.taken = np.empty((T, K, L, ACT_DIM), np.float32)
        self.expert = np.empty((T, K, L, ACT_DIM), np.float32)
        self.reward = np.empty((T, K, L), np.float32)
        self.success = np.empty((T, K, L), np.uint8)

    def __call__(self, episode: int, t: int, obs: np.ndarray, info: dict, actions: np.ndarray,
                 reward: np.ndarray, success: np.ndarray) -> None:
        if episode < self.context_only:  # context only: no label, no loss
            label = np.full((len(self.names), ACT_DIM), np.nan, np.float32)
        else:
            label = self.label(self.names, obs, info["goal"])  # (T, 4)
        self.obs[:, episode, t], self.expert[:, episode, t], self.taken[:, episode, t] = obs, label, actions
        self.reward[:, episode, t] = reward
        self.success[:, episode, t] = success > 0

    def imitate_successes(self) -> None:
        """Self-imitation: each episode after a successful one of its trial takes as labels the actions of the
        latest successful episode before it, decision by decision (``GenerateConfig.self_imitation``)."""
        T, K, _ = self.success.shape
        succeeded = self.success.any(axis=2)  # (T, K)
        latest = np.maximum.accumulate(np.where(succeeded, np.arange(K)[None], -1), axis=1)  # at or before k
        source = np.concatenate([np.full((T, 1), -1), latest[:, :-1]], axis=1)  # strictly before k
        trial, episode = np.nonzero(source >= 0)
        self.expert[trial, episode] = self.taken[trial, source[trial, episode]]

    def arrays(self) -> dict[str, np.ndarray]:
        """The shard's step fields: flat, trial-major (trial, episode, step)."""
        T, K, L = self.reward.shape
        episode = np.broadcast_to(np.arange(K, dtype=np.int16)[None, :, None], (T, K, L))
        step = np.broadcast_to(np.arange(L, dtype=np.int16)[None, None, :], (T, K, L))
        flat = lambda a: np.ascontiguousarray(rearrange(a, "t k l ... -> (t k l) ..."))  # noqa: E731
        return {
            "obs": flat(self.obs),  # (N, 39)
            "actions": flat(self.taken),  # (N, 4)
            "expert_actions": flat(self.expert),  # (N, 4)
            "rewards": flat(self.reward),  # (N,)
            "successes": flat(self.success),  # (N,)
            "episode": flat(episode),  # (N,)
            "step": flat(step),  # (N,)
        }


def play_shard(tasks: list, cfg: GenerateConfig, shard_seed: int) -> dict[str, np.ndarray]:
    """Play one trial per task through the rollout loop with the annealed-noise expert (or, relabelling,
    a policy with its own context, then possibly the noisy expert); the shard's step arrays.

    Obs keep the goal hidden; the expert is told the true goal from ``info["goal"]``.
    """
    T, K = len(tasks), cfg.episodes_per_trial
    # Each agent is started here with its own seed (the policy's in 31 bits), as shards always were.
    expert = NoisyExpertAgent(cfg.noise_kind, cfg.noise_schedule, cfg.noise_max, K,
                              parse_goal_offsets(cfg.expert_goal_offsets), cfg.action_noise)
    expert.start_trials(T, shard_seed)
    agent, context_only = expert, 0
    if cfg.policy:
        from icl_metarl.incontext.agent import InContextAgent  # torch and transformers: only a policy needs them

        policy = InContextAgent.from_pretrained(cfg.policy, explore_episodes=cfg.policy_explore_episodes,
                                                explore_scale=cfg.policy_explore_scale,
                                                explore_kind=cfg.policy_explore_kind)
        if policy.action_repeat != cfg.action_repeat:
            raise UsageError(f"policy {cfg.policy} acts every {policy.action_repeat} simulator steps; these histories "
                             f"are played at action_repeat={cfg.action_repeat}")
        policy.start_trials(T, shard_seed % (2**31))
        agent = HandoverAgent(policy, expert, cfg.handover) if cfg.handover else policy
        context_only = cfg.handover
    decisions = decisions_per_episode(cfg.episode_length, cfg.action_repeat)
    record = ShardRecorder([t.env_name for t in tasks], K, decisions, expert.label, context_only)
    for _ in play_trials(agent, tasks, shard_seed % (2**31 - T), shard_seed, K, 0, cfg.episode_length,
                         on_step=record, start_trials=False, action_repeat=cfg.action_repeat):
        pass
    if cfg.self_imitation:
        record.imitate_successes()
    return record.arrays()
