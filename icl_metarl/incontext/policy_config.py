"""The in-context policy's configuration (a ``transformers`` ``PretrainedConfig``, saved as its
checkpoint's ``config.json``): its shape and acting defaults, validated where they enter.

Not for: the learner's data and training settings (``config.py``) or reading a checkpoint (``model.py``).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.incontext.attention import ATTN_IMPLEMENTATIONS, best_candidates, kept_steps
from icl_metarl.incontext.config import EXPLORE_KINDS, MODEL_TYPE

ACTION_HEADS = ("deterministic", "tanh_gaussian")


class ICLPolicyConfig(PretrainedConfig):
    """Shape and behaviour of the in-context policy; the defaults (d=64, 3 layers, 4 heads, 0.32M parameters at
    500-step episodes) are the size every measured CPU recipe used (docs/results.md); GPU configs set larger.

    Args:
        obs_dim: observation size (Meta-World: 39).
        act_dim: action size (Meta-World: 4).
        d_model: width of the token embedding and of every layer.
        n_layer: number of Transformer blocks.
        n_head: attention heads per block (must divide d_model).
        max_episode_length: size of the step-in-episode embedding; longer episodes are an error.
        max_context_episodes: the trained context, in whole episodes; positions = this x max_episode_length.
        action_head: "deterministic" (tanh of a linear map, MSE loss) or "tanh_gaussian" (NLL loss).
        reward_scale: previous rewards are multiplied by this before embedding (reach rewards reach 10).
        dropout: dropout on embeddings, attention and residuals during training.
        attn_implementation: "sdpa", "eager" (returns attention weights) or "flash_attention_2".
        explore_episodes: acting default of the in-context agent: in the first this many episodes of a
            trial, every trial adds a constant random offset to its actions (one draw per trial and
            episode), so its early episodes go to different places; the context then holds the rewards of
            places a posterior-mean policy would never visit. 0: no exploration.
        explore_scale: standard deviation of that offset, in action units (actions lie in [-1, 1]).
        explore_kind: "offset" (the constant offset above) or "step": a fresh N(0, explore_scale^2)
            perturbation of the pre-squash action at every decision of the exploring episodes, as a
            Gaussian policy samples. Relabelling rounds' trials and the evaluator act with it.
        context_stride: what the policy reads of earlier episodes. 0: every token of the last
            ``max_context_episodes`` episodes, with absolute positions (the ML1 recipes). s >= 1: the compact
            cross-episode context: the current episode in full and each earlier episode of the trial by
            its tokens at steps s-1, 2s-1, ... and its last step (which has read its whole episode: a
            summary of it); positions are then the step in the episode and the episode's index in the
            trial, of which ``max_context_episodes`` are embedded (later ones share the last; see
            ``trained_episodes``). Training reads a trial's first episodes whole under this mask, so every
            token trains on exactly the context it acts on, up to the episodes its windows hold.
        context_keep_best: compact context only: each earlier episode also keeps ``context_best_steps`` more
            tokens, its steps of highest previous reward among those the stride drops (``attention.best_steps``): the
            observation where the episode's reward peaked, which a hidden goal otherwise leaves between
            two strided tokens.
        context_best_steps: under ``context_keep_best``, how many such steps each earlier episode keeps
            (the highest rewards; ties at the top spread evenly in time, so where the reward is flat
            inside a goal's success region the kept steps span that region). 1: the single best step.
        trained_episodes: compact context only: how many episode indices of a trial training showed (its
            windows' episodes); later episodes share the last of their embeddings, as earlier ones were
            trained, instead of reading embedding rows no gradient ever reached. 0: every one of the
            ``max_context_episodes`` indices has its own (checkpoints from before session 34).
        action_repeat: the decision interval the policy was trained at (it acts every k-th simulator
            step, the action held in between); an evaluation at another interval is refused.
        obs_mean, obs_std: per-dimension statistics of the training data's observations (``train icl
            --normalize-obs``): the policy reads (obs - obs_mean) / obs_std. None: raw observations.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        obs_dim: int = 39,
        act_dim: int = 4,
        d_model: int = 64,
        n_layer: int = 3,
        n_head: int = 4,
        max_episode_length: int = 500,
        max_context_episodes: int = 4,
        action_head: str = "deterministic",
        reward_scale: float = 0.1,
        dropout: float = 0.0,
        attn_implementation: str = "sdpa",
        explore_episodes: int = 0,
        explore_scale: float = 0.0,
        explore_kind: str = "offset",
        context_stride: int = 0,
        context_keep_best: bool = False,
        context_best_steps: int = 1,
        trained_episodes: int = 0,
        action_repeat: int = 1,
        obs_mean: list[float] | None = None,
        obs_std: list[float] | None = None,
        **kwargs,
    ):
        # transformers keeps its own private attention setting; ours is a plain field so that it is
        # saved in config.json and never sent to the hub-kernel loader of transformers.
        kwargs.pop("_attn_implementation", None)
        super().__init__(**kwargs)
        for name, value in (
            ("obs_dim", obs_dim), ("act_dim", act_dim), ("d_model", d_model), ("n_layer", n_layer),
            ("n_head", n_head), ("max_episode_length", max_episode_length),
            ("max_context_episodes", max_context_episodes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if d_model % n_head:
            raise UsageError(f"n_head={n_head} must divide d_model={d_model}")
        if action_head not in ACTION_HEADS:
            raise choice_error("action_head", action_head, ACTION_HEADS)
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise choice_error("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
        if not isinstance(explore_episodes, int) or isinstance(explore_episodes, bool) or explore_episodes < 0:
            raise UsageError(f"explore_episodes must be an integer >= 0, got {explore_episodes!r}")
        if not isinstance(context_stride, int) or isinstance(context_stride, bool) or context_stride < 0:
            raise UsageError(f"context_stride must be an integer >= 0 (0: full context), got {context_stride!r}")
        if not isinstance(context_keep_best, bool):
            raise UsageError(f"context_keep_best must be true or false, got {context_keep_best!r}")
        if not isinstance(context_best_steps, int) or isinstance(context_best_steps, bool) or context_best_steps < 1:
            raise UsageError(f"context_best_steps must be an integer >= 1, got {context_best_steps!r}")
        if (not isinstance(trained_episodes, int) or isinstance(trained_episodes, bool)
                or not 0 <= trained_episodes <= max_context_episodes):
            raise UsageError(f"trained_episodes must be an integer in [0, max_context_episodes={max_context_episodes}] "
                             f"(0: all), got {trained_episodes!r}")
        if context_keep_best and context_stride < 1:
            raise UsageError("context_keep_best needs the compact context (context_stride >= 1), got context_stride 0")
        if not isinstance(action_repeat, int) or isinstance(action_repeat, bool) or action_repeat < 1:
            raise UsageError(f"action_repeat (decision interval) must be an integer >= 1, got {action_repeat!r}")
        if (obs_mean is None) != (obs_std is None) or (obs_mean is not None and not (
                len(obs_mean) == len(obs_std) == obs_dim and all(float(v) > 0 for v in obs_std))):
            raise UsageError(f"obs_mean and obs_std must both be lists of obs_dim={obs_dim} numbers (std > 0) or both "
                             f"None, got {obs_mean!r} and {obs_std!r}")
        if explore_kind not in EXPLORE_KINDS:
            raise choice_error("explore_kind", explore_kind, EXPLORE_KINDS)
        if not float(explore_scale) >= 0.0:
            raise UsageError(f"explore_scale must be >= 0, got {explore_scale!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {dropout!r}")
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.max_episode_length = max_episode_length
        self.max_context_episodes = max_context_episodes
        self.action_head = action_head
        self.reward_scale = float(reward_scale)
        self.dropout = float(dropout)
        self.attn_implementation = attn_implementation
        self.explore_episodes = explore_episodes
        self.explore_scale = float(explore_scale)
        self.explore_kind = explore_kind
        self.context_stride = context_stride
        self.context_keep_best = context_keep_best
        self.context_best_steps = context_best_steps
        self.trained_episodes = trained_episodes
        self.action_repeat = action_repeat
        self.obs_mean = None if obs_mean is None else [float(v) for v in obs_mean]
        self.obs_std = None if obs_std is None else [float(v) for v in obs_std]

    @property
    def compact(self) -> bool:
        """Whether earlier episodes are read compactly (``context_stride`` >= 1)."""
        return self.context_stride > 0

    @property
    def embedded_episodes(self) -> int:
        """Compact context: the episode indices with an embedding of their own (``trained_episodes``, or all
        ``max_context_episodes``); episode i reads row min(i, this - 1)."""
        return self.trained_episodes or self.max_context_episodes

    @property
    def kept_best(self) -> int:
        """How many best-rewarded steps each earlier episode keeps beside its strided ones: 0 without
        ``context_keep_best``, else ``context_best_steps``."""
        return self.context_best_steps if self.context_keep_best else 0

    @property
    def kept_per_episode(self) -> int:
        """Compact context: the most tokens a finished episode keeps (its strided steps, its last, and
        under ``context_keep_best`` its best-rewarded other steps)."""
        kept = len(kept_steps(self.max_episode_length, self.context_stride))
        return kept + min(self.kept_best, len(best_candidates(self.max_episode_length, self.context_stride)))

    @property
    def max_positions(self) -> int:
        """Tokens in the trained context: whole episodes of the longest allowed length (full context);
        for the compact one, the tokens of a trial of ``max_context_episodes`` episodes (KV-cache size)."""
        if self.compact:
            return (self.max_context_episodes - 1) * self.kept_per_episode + self.max_episode_length
        return self.max_context_episodes * self.max_episode_length
