"""The in-context regressor: a causal Transformer that reads K (x, y) pairs and predicts y at query points.

Built from the in-context policy's blocks (``incontext.model.Block``) inside a ``transformers``
config/model pair, saved as ``config.json`` + ``model.safetensors``. Tokens: ``[x_i, y_i, 1]`` per support
point, then ``[x_q, 0, 0]`` per query point; support tokens attend causally to earlier support tokens, and
a query attends to its first ``shots`` support tokens and itself, never to another query, so one forward
scores many queries, each at its own number of shots. No position embedding: the causal mask is the only
order. Also here: ``LinearSelfAttention``, one attention layer whose weights are set by hand (von Oswald
et al. 2023). Not for: training (``train.py``) or scoring (``evaluation.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from icl_metarl.fewshot.config import MODEL_TYPE
from icl_metarl.harness.errors import UsageError, choice_error
from icl_metarl.harness.files import atomic_write_bytes, atomic_write_text, read_json
from icl_metarl.incontext.model import Block

ATTENTION = ("sdpa", "eager")
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class ICLRegressorConfig(PretrainedConfig):
    """Shape of the in-context regressor.

    Args:
        x_dim: input dimension of the task family (1 for sinusoids, d for linear regression).
        d_model: width of the token embedding and of every block.
        n_layer: number of Transformer blocks.
        n_head: attention heads per block (must divide d_model).
        max_shots: the most support points seen in one training context (more can be read at test time).
        dropout: dropout in the blocks during training.
        attn_implementation: "sdpa" or "eager" (returns attention weights, for probes).
        family: the task family it was trained on (a name from ``harness.regression_tasks``).
    """

    model_type = MODEL_TYPE

    def __init__(self, x_dim: int = 1, d_model: int = 64, n_layer: int = 4, n_head: int = 4, max_shots: int = 20,
                 dropout: float = 0.0, attn_implementation: str = "sdpa", family: str = "maml-sine", **kwargs):
        kwargs.pop("_attn_implementation", None)
        super().__init__(**kwargs)
        for name, value in (("x_dim", x_dim), ("d_model", d_model), ("n_layer", n_layer), ("n_head", n_head),
                            ("max_shots", max_shots)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if d_model % n_head:
            raise UsageError(f"n_head={n_head} must divide d_model={d_model}")
        if attn_implementation not in ATTENTION:
            raise choice_error("attn_implementation", attn_implementation, ATTENTION)
        self.x_dim, self.d_model, self.n_layer, self.n_head = x_dim, d_model, n_layer, n_head
        self.max_shots, self.dropout = max_shots, float(dropout)
        self.attn_implementation, self.family = attn_implementation, family


# ------------------------------------------------------------------------------- pure functions
def context_mask(k: int, shots: torch.Tensor) -> torch.Tensor:
    """Who may attend to whom: (B, K+M, K+M) bool, True where row token i reads column token j.

    ``shots`` (B, M) is the number of support points each query reads (1..K). Support rows are causal
    over the support; query m reads support tokens j < shots[m] and itself, no other query.
    """
    b, m = shots.shape
    t = k + m
    idx = torch.arange(t, device=shots.device)
    mask = torch.zeros(b, t, t, dtype=torch.bool, device=shots.device)
    mask[:, :k, :k] = idx[None, :k] <= idx[:k, None]  # causal support
    mask[:, k:, :k] = idx[None, None, :k] < shots[:, :, None]  # (B, M, K): the first shots[m] points
    mask[:, k:, k:] = torch.eye(m, dtype=torch.bool, device=shots.device)  # itself
    return mask


def query_shots(shots: int | torch.Tensor | None, b: int, k: int, m: int, device=None) -> torch.Tensor:
    """Shots per query as a (B, M) tensor: None means all K support points, an int means that many."""
    if shots is None:
        shots = k
    if isinstance(shots, int):
        if not 1 <= shots <= k:
            raise UsageError(f"shots must be in [1, {k}] (the support points given), got {shots}")
        return torch.full((b, m), shots, dtype=torch.long, device=device)
    return shots.to(device=device, dtype=torch.long).expand(b, m)


def masked_sdpa(mask: torch.Tensor):
    """An attention function for ``Block`` with a fixed boolean mask (B, T, T); no weights returned. The
    Block's own ``mask`` argument (the policy's compact context) is None here: this function carries its mask."""
    def attend(q, k, v, dropout_p: float, _block_mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout_p), None
    return attend


def masked_eager(mask: torch.Tensor):
    """Attention written out with a fixed boolean mask (B, T, T), returning the weights (B, nh, T, T)."""
    def attend(q, k, v, dropout_p: float, _block_mask=None):
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
        weights = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        return F.dropout(weights, dropout_p) @ v, weights
    return attend


# ----------------------------------------------------------------------------------------- model
@dataclass
class ICLRegressorOutput(ModelOutput):
    """prediction: (B, M) at the query points; attentions: per layer (B, nh, K+M, K+M) when asked (eager)."""

    prediction: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class ICLRegressor(PreTrainedModel):
    """Support and query tokens -> blocks (the in-context policy's) -> one number per query token."""

    config_class = ICLRegressorConfig
    base_model_prefix = "icl_regressor"
    main_input_name = "support_x"
    _no_split_modules = ["Block"]

    def __init__(self, config: ICLRegressorConfig):
        super().__init__(config)
        self.token_in = nn.Linear(config.x_dim + 2, config.d_model)  # x, y, is-support flag
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, 1)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                shots: int | torch.Tensor | None = None, output_attentions: bool = False) -> ICLRegressorOutput:
        """support_x (B, K, x_dim), support_y (B, K) or (B, K, 1), query_x (B, M, x_dim) -> (B, M)."""
        b, k, _ = support_x.shape
        m = query_x.shape[1]
        if output_attentions and self.config.attn_implementation != "eager":
            raise UsageError("output_attentions needs attn_implementation='eager'")
        support_y = support_y.reshape(b, k, 1).to(support_x.dtype)
        ones, zeros = support_x.new_ones(b, k, 1), query_x.new_zeros(b, m, 2)
        tokens = torch.cat([torch.cat([support_x, support_y, ones], -1), torch.cat([query_x, zeros], -1)], 1)
        x = self.token_in(tokens)  # (B, K+M, d)
        mask = context_mask(k, query_shots(shots, b, k, m, support_x.device))  # (B, K+M, K+M)
        attend = (masked_eager if self.config.attn_implementation == "eager" else masked_sdpa)(mask)
        attentions = []
        for layer, block in enumerate(self.blocks):
            x, weights = block(x, attend, None, layer)
            attentions.append(weights)
        prediction = self.head(self.ln_f(x[:, k:]))[..., 0]  # (B, M)
        return ICLRegressorOutput(prediction=prediction, attentions=tuple(attentions) if output_attentions else None)

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        """Predictions (B, M) from all the support points given: the evaluator's and the probe's call."""
        return self(support_x, support_y, query_x).prediction

    # ---------------------------------------------------------------------------------- files
    def save_pretrained(self, save_directory, **_) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory``, each atomically."""
        path = Path(save_directory)
        self.config.architectures = [type(self).__name__]
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(path / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        atomic_write_text(path / CONFIG_NAME, self.config.to_json_string(use_diff=False))

    @classmethod
    def from_pretrained(cls, path, attn_implementation: str | None = None, **_) -> "ICLRegressor":
        """Load a directory written by ``save_pretrained``; any problem is one UsageError naming the file."""
        path = Path(path)
        d = read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else None
        if not isinstance(d, dict) or d.get("model_type") != MODEL_TYPE:
            raise UsageError(f"{path / CONFIG_NAME} is not the config of an in-context regressor "
                             f"(model_type {MODEL_TYPE!r})")
        config = ICLRegressorConfig.from_dict(d)
        if attn_implementation is not None:
            config.attn_implementation = attn_implementation
        try:
            state = load_file(str(path / WEIGHTS_NAME))
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"cannot read weights {path / WEIGHTS_NAME}: {str(e).splitlines()[0]}") from None
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UsageError(f"weights {path / WEIGHTS_NAME} do not match {path / CONFIG_NAME}: "
                             f"{str(e).splitlines()[0]}") from None
        return model.eval()


AutoConfig.register(MODEL_TYPE, ICLRegressorConfig, exist_ok=True)
AutoModel.register(ICLRegressorConfig, ICLRegressor, exist_ok=True)


# ------------------------------------------------------------------------ a layer set by hand
class LinearSelfAttention(nn.Module):
    """One linear self-attention layer over tokens e_j = (x_j, y_j), queries (x_q, 0), no softmax:

        e_q <- e_q + P W_V sum_j e_j (W_K e_j)^T W_Q e_q / K      (the construction of von Oswald et al. 2023)

    summed over the K support tokens; the prediction is the updated y coordinate of the query token.
    ``gradient_step(d, lr)`` sets the weights that make it one gradient-descent step from w = 0 on the
    support's loss (1/2K) sum_j (w.x_j - y_j)^2, i.e. the prediction lr/K sum_j y_j x_j.x_q.
    """

    def __init__(self, w_k: torch.Tensor, w_q: torch.Tensor, w_v: torch.Tensor, p: torch.Tensor):
        super().__init__()
        self.w_k, self.w_q, self.w_v, self.p = (nn.Parameter(t.clone()) for t in (w_k, w_q, w_v, p))

    @classmethod
    def gradient_step(cls, d: int, lr: float) -> "LinearSelfAttention":
        x_part = torch.zeros(d + 1, d + 1)
        x_part[:d, :d] = torch.eye(d)  # W_K = W_Q: read x
        y_part = torch.zeros(d + 1, d + 1)
        y_part[d, d] = 1.0  # W_V: read y
        return cls(x_part, x_part, y_part, lr * y_part)  # P: write lr * (sum) into the y coordinate

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        """(B, K, d), (B, K) or (B, K, 1), (B, M, d) -> (B, M)."""
        b, k, _ = support_x.shape
        e = torch.cat([support_x, support_y.reshape(b, k, 1)], -1)  # (B, K, d+1)
        q = torch.cat([query_x, query_x.new_zeros(*query_x.shape[:2], 1)], -1)  # (B, M, d+1)
        keys, values, queries = e @ self.w_k.T, e @ self.w_v.T, q @ self.w_q.T
        update = (queries @ keys.transpose(1, 2)) @ values / k @ self.p.T  # (B, M, d+1)
        return (q + update)[..., -1]
