"""Medusa decoding heads in plain PyTorch.

Head ``i`` (0-based) reads the base model's last hidden state at position ``t`` and predicts
the token at ``t + 2 + i`` (the base LM head predicts ``t + 1``). A head is ``num_layers``
residual blocks ``x + SiLU(W x + b)`` followed by a map to the vocabulary: either its own
LM head or the base model's (the "shared LM head" variant, much cheaper to train and run).

All heads are evaluated together: the block weights of the K heads are stacked so that one
batched matmul per layer serves every head.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MedusaConfig:
    """Shape and variant of a set of Medusa heads (the canonical ``config.json``)."""

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_layers: int = 1
    # True: every head maps to the vocabulary with the base model's LM head.
    shared_lm_head: bool = False
    base_model_name_or_path: str | None = None
    # Optional extra metadata (training recipe, accuracies, ...), kept verbatim.
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MedusaConfig.{name} must be a positive integer, got {value!r}")
        layers = self.num_layers
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise ValueError(
                f"MedusaConfig.num_layers must be a non-negative integer, got {self.num_layers!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MedusaConfig:
        return config_from_dict(cls, data, "Medusa config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def config_from_dict(cls, data: dict, what: str):
    """A config dataclass from a checkpoint's ``config.json`` (format keys ignored); unknown
    and missing keys are errors naming them."""
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known - {"format", "format_version"}
    if unknown:
        raise ValueError(f"unknown keys in {what}: {sorted(unknown)}")
    missing = [
        name
        for name, f in cls.__dataclass_fields__.items()
        if name not in data and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"missing keys in {what}: {missing}")
    return cls(**{k: v for k, v in data.items() if k in known})


class MedusaHeads(nn.Module):
    """K Medusa heads with stacked weights.

    Parameters (K heads, L layers, hidden size H, vocabulary V):
      - ``block_weight`` ``[K, L, H, H]`` and ``block_bias`` ``[K, L, H]``: the residual blocks;
      - ``lm_head_weight`` ``[K, V, H]``: present only when the heads have their own LM heads.
    """

    def __init__(self, config: MedusaConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        k, n_layers, h, v = (
            config.num_heads,
            config.num_layers,
            config.hidden_size,
            config.vocab_size,
        )
        # Zero residual weights: a fresh head starts as the identity (as in the reference).
        self.block_weight = nn.Parameter(torch.zeros(k, n_layers, h, h, dtype=dtype))
        self.block_bias = nn.Parameter(torch.zeros(k, n_layers, h, dtype=dtype))
        if config.shared_lm_head:
            self.lm_head_weight = None
        else:
            self.lm_head_weight = nn.Parameter(torch.zeros(k, v, h, dtype=dtype))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def init_from_base_lm_head(self, base_lm_head_weight: torch.Tensor) -> None:
        """Reference initialisation: own LM heads start as copies of the base LM head."""
        if self.lm_head_weight is None:
            return
        expected = tuple(self.lm_head_weight.shape[1:])
        if tuple(base_lm_head_weight.shape) != expected:
            raise ValueError(
                f"base LM head has shape {tuple(base_lm_head_weight.shape)}, "
                f"heads expect {expected} (vocab, hidden)"
            )
        with torch.no_grad():
            self.lm_head_weight.copy_(
                base_lm_head_weight.unsqueeze(0).expand_as(self.lm_head_weight)
            )

    def forward(self, hidden_states: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """Residual blocks of the first ``num_heads`` heads (default all K): ``[N, H]`` ->
        ``[num_heads, N, H]``. A shallow tree prefix needs only the first heads."""
        if hidden_states.dim() != 2:
            raise ValueError(
                f"hidden states must be [N, H] (tokens, hidden), got {tuple(hidden_states.shape)}"
            )
        if hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden states have size {hidden_states.shape[-1]}, "
                f"heads expect {self.config.hidden_size}"
            )
        k = self.config.num_heads if num_heads is None else num_heads
        if not 1 <= k <= self.config.num_heads:
            raise ValueError(f"num_heads must be in [1, {self.config.num_heads}], got {num_heads}")
        x = hidden_states.to(self.block_weight.dtype).unsqueeze(0)
        x = x.expand(k, *hidden_states.shape)
        for layer in range(self.config.num_layers):
            w = self.block_weight[:k, layer]  # [k, H, H], rows = output features
            b = self.block_bias[:k, layer].unsqueeze(1)  # [k, 1, H]
            x = x + F.silu(torch.baddbmm(b, x, w.transpose(1, 2)))
        return x

    def logits(
        self,
        hidden_states: torch.Tensor,
        base_lm_head_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of every head: ``[N, H]`` -> ``[K, N, V]``."""
        return self.compute_logits(self(hidden_states), base_lm_head_weight)

    def compute_logits(
        self,
        head_states: torch.Tensor,
        base_lm_head_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Vocabulary logits from the block outputs of the first heads ``[k, N, H]`` ->
        ``[k, N, V]``."""
        if self.lm_head_weight is not None:
            weight = self.lm_head_weight[: head_states.shape[0]]
            return torch.bmm(head_states, weight.transpose(1, 2))
        if base_lm_head_weight is None:
            raise ValueError("these heads share the base model's LM head: pass base_lm_head_weight")
        k, n, h = head_states.shape
        if base_lm_head_weight.dim() != 2 or base_lm_head_weight.shape[1] != h:
            raise ValueError(
                f"base LM head must be [vocab, {h}], got {tuple(base_lm_head_weight.shape)}"
            )
        w = base_lm_head_weight.to(head_states.dtype)
        return (head_states.reshape(k * n, h) @ w.t()).view(k, n, -1)

    @torch.no_grad()
    def topk(
        self,
        hidden_states: torch.Tensor,
        k: int,
        base_lm_head_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Top-``k`` token ids of every head, best first: ``[N, H]`` -> ``[N, K, k]``."""
        logits = self.logits(hidden_states, base_lm_head_weight)
        return logits.topk(k, dim=-1).indices.permute(1, 0, 2).contiguous()
