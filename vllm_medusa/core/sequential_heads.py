"""Sequentially dependent ("Hydra-style") draft heads over a draft vocabulary.

A Medusa-1 head guesses token ``t + 2 + i`` from the hidden state ``h_t`` alone, blind to
the tokens before it. A sequential head also reads the token it continues, so a tree is
drafted depth by depth along each node's own path:

    s_0 = h_t                                   # base model's last hidden state (LM-head input)
    s_{d+1} = head_d(s_d, E[x_{t+1+d}])          # x_{t+1} = the bonus token, then drafted tokens
    head_d(s, e) = blocks_d(A_d [s; e] + a_d)   # blocks: L residual ``x + SiLU(W x + b)``
    logits_{d+1} = D s_{d+1}                     # over the draft vocabulary, ``[V']``

``E`` is the base model's (frozen) input embedding; ``D`` ``[V', H]`` maps to the ``V'`` most
frequent tokens of the base model's own outputs (``draft_token_ids``, ascending full ids), so
drafting and training never touch the full vocabulary. ``A_d`` starts as ``[I, 0]`` (a fresh
head is a Medusa-1 head that ignores the token), ``W`` at zero, ``D`` as the base LM head's
rows. The recurrence passes the path down: head ``d`` reads ``s_d``, which already saw every
token before it on the path.

In a tree, node ``n`` at depth ``d`` holds a token; if ``n`` has children their tokens are the
top-k of ``D head_d(s_parent(n), E[token_n])`` (the root is the bonus token with parent state
``h_t``). One batched call per depth over the tree's internal nodes at that depth.

Checkpoint: a folder with ``config.json`` (``"format": "vllm-medusa-sequential"``) and
``heads.safetensors`` (``in_proj_weight [K, H, 2H]``, ``in_proj_bias [K, H]``, ``block_weight
[K, L, H, H]``, ``block_bias [K, L, H]``, ``draft_lm_head [V', H]``, ``draft_token_ids [V']``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vllm_medusa.core.heads import config_from_dict
from vllm_medusa.core.tree import MedusaTree

SEQUENTIAL_FORMAT = "vllm-medusa-sequential"
SEQUENTIAL_FORMAT_VERSION = 1
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"

Embed = Callable[[torch.Tensor], torch.Tensor]  # token ids [...] -> embeddings [..., H]
# A dense product with its weight bound in: x [..., in] -> x @ W.T + b [..., out]
Linear = Callable[[torch.Tensor], torch.Tensor]
# Builds a Linear from (weight [out, in], bias [out] | None), e.g. a prepacked CPU GEMM
MakeLinear = Callable[[torch.Tensor, torch.Tensor | None], Linear]


@dataclass
class SequentialConfig:
    """Shape of a set of sequential heads (the ``config.json`` of their folder)."""

    hidden_size: int
    vocab_size: int  # the base model's (full) vocabulary
    num_heads: int
    draft_vocab_size: int
    num_layers: int = 1
    base_model_name_or_path: str | None = None
    extra: dict = field(default_factory=dict)
    head_type: str = "sequential"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads", "draft_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"SequentialConfig.{name} must be a positive integer, got {value!r}"
                )
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise ValueError(
                f"SequentialConfig.num_layers must be an integer, got {self.num_layers!r}"
            )
        if self.num_layers < 0:
            raise ValueError(f"SequentialConfig.num_layers must be >= 0, got {self.num_layers}")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"draft_vocab_size {self.draft_vocab_size} exceeds vocab_size {self.vocab_size}"
            )
        if self.head_type != "sequential":
            raise ValueError(f"head_type must be 'sequential', got {self.head_type!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SequentialConfig:
        return config_from_dict(cls, data, "sequential heads config")


class SequentialHeads(nn.Module):
    """K sequential heads with stacked weights and one draft LM head."""

    def __init__(
        self,
        config: SequentialConfig,
        draft_token_ids: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.config = config
        k, n_layers, h = config.num_heads, config.num_layers, config.hidden_size
        v = config.draft_vocab_size
        eye = torch.eye(h, dtype=dtype)
        self.in_proj_weight = nn.Parameter(
            torch.cat([eye, torch.zeros(h, h, dtype=dtype)], dim=1).repeat(k, 1, 1)
        )
        self.in_proj_bias = nn.Parameter(torch.zeros(k, h, dtype=dtype))
        self.block_weight = nn.Parameter(torch.zeros(k, n_layers, h, h, dtype=dtype))
        self.block_bias = nn.Parameter(torch.zeros(k, n_layers, h, dtype=dtype))
        self.draft_lm_head = nn.Parameter(torch.zeros(v, h, dtype=dtype))
        if draft_token_ids is None:
            draft_token_ids = torch.arange(v)
        self.register_buffer("draft_token_ids", check_draft_vocab(draft_token_ids, config))
        self._kernels: _DraftKernels | None = None

    def use_linear_kernels(self, make_linear: MakeLinear | None) -> None:
        """Serve drafting's dense products through kernels built once from each weight (a
        serving engine's prepacked GEMM: at a handful of rows the plain ``F.linear`` of a
        CPU is several times slower); ``None`` goes back to ``F.linear``. Inference only:
        the kernels keep their own copy of the weights, so call it again after changing
        them."""
        if make_linear is None:
            self._kernels = None
            return
        k, n_layers = self.config.num_heads, self.config.num_layers
        with torch.no_grad():
            self._kernels = _DraftKernels(
                in_proj=[
                    make_linear(self.in_proj_weight[d], self.in_proj_bias[d]) for d in range(k)
                ],
                blocks=[
                    [
                        make_linear(self.block_weight[d, i], self.block_bias[d, i])
                        for i in range(n_layers)
                    ]
                    for d in range(k)
                ],
                lm_head=make_linear(self.draft_lm_head, None),
            )

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def init_draft_lm_head(self, base_lm_head_weight: torch.Tensor) -> None:
        """The draft LM head starts as the base LM head's rows of the draft vocabulary."""
        if base_lm_head_weight.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(
                f"base LM head has shape {tuple(base_lm_head_weight.shape)}, expected "
                f"({self.config.vocab_size}, {self.config.hidden_size})"
            )
        with torch.no_grad():
            self.draft_lm_head.copy_(base_lm_head_weight[self.draft_token_ids.cpu()])

    def step(self, depth: int, state: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
        """Head ``depth``: parent states ``[..., H]`` and token embeddings ``[..., H]`` ->
        the node states ``[..., H]``."""
        x = torch.cat([state, token_emb.to(state.dtype)], dim=-1)
        if self._kernels is not None:
            x = self._kernels.in_proj[depth](x)
            for block in self._kernels.blocks[depth]:
                x = x + F.silu(block(x))
            return x
        x = F.linear(x, self.in_proj_weight[depth], self.in_proj_bias[depth])
        for layer in range(self.config.num_layers):
            w, b = self.block_weight[depth, layer], self.block_bias[depth, layer]
            x = x + F.silu(F.linear(x, w, b))
        return x

    def draft_logits(self, states: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> logits over the draft vocabulary ``[..., V']``."""
        if self._kernels is not None:
            return self._kernels.lm_head(states)
        return F.linear(states, self.draft_lm_head)

    def to_full_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> the base model's token ids."""
        return self.draft_token_ids[draft_ids]

    def path_states(self, hidden: torch.Tensor, path_emb: torch.Tensor) -> torch.Tensor:
        """Teacher-forced states along one path per row: hidden ``[N, H]``, embeddings of
        the path tokens ``[N, K, H]`` (bonus token first) -> states ``[K, N, H]``; state
        ``d`` predicts the token after path token ``d``."""
        states, s = [], hidden.to(self.in_proj_weight.dtype)
        for d in range(path_emb.shape[1]):
            s = self.step(d, s, path_emb[:, d])
            states.append(s)
        return torch.stack(states)

    @torch.no_grad()
    def fill_tree(
        self,
        plan: SequentialTreePlan,
        hidden: torch.Tensor,
        bonus: torch.Tensor,
        embed: Embed,
        num_nodes: int | None = None,
    ) -> torch.Tensor:
        """Tokens of the first ``num_nodes`` tree nodes (breadth-first; default all)
        ``[B, n]`` from the roots' hidden states ``[B, H]`` and bonus tokens ``[B]``."""
        n = plan.num_nodes if num_nodes is None else num_nodes
        if not 0 <= n <= plan.num_nodes:
            raise ValueError(f"num_nodes must be in [0, {plan.num_nodes}], got {num_nodes}")
        b = hidden.shape[0]
        tokens = torch.empty(b, plan.num_nodes + 1, dtype=torch.long, device=hidden.device)
        tokens[:, 0] = bonus
        # States of the internal nodes of the previous depth ([B, m, H]); the root's parent
        # state is the hidden state itself.
        parent_states = hidden.to(self.in_proj_weight.dtype)[:, None]
        for level in plan.levels[: plan.depth_of_prefix(n)]:
            node_tokens = tokens[:, level.internal_nodes]  # [B, m]
            emb = embed(node_tokens.reshape(-1)).view(*node_tokens.shape, -1)  # [B, m, H]
            states = self.step(level.depth, parent_states[:, level.internal_parent_slot], emb)
            top = self.draft_logits(states).topk(level.top_k, dim=-1).indices  # [B, m, k]
            child_ids = self.draft_token_ids[top[:, level.child_slot, level.child_rank]]
            tokens[:, level.children] = child_ids
            parent_states = states
        return tokens[:, 1 : n + 1]


@dataclass(frozen=True)
class _DraftKernels:
    in_proj: list[Linear]  # [K]
    blocks: list[list[Linear]]  # [K][L]
    lm_head: Linear


@dataclass(frozen=True)
class TreeLevel:
    """Drafting work of one depth: heads ``depth`` runs on ``internal_nodes`` (nodes of
    that depth with children; their parents' slots among the previous level's internal
    nodes) and fills ``children`` from slot ``child_slot``'s top ``child_rank``."""

    depth: int
    internal_nodes: torch.Tensor  # [m] node ids (root = 0)
    internal_parent_slot: torch.Tensor  # [m] index into the previous level's internal nodes
    children: torch.Tensor  # [c] node ids at depth + 1
    child_slot: torch.Tensor  # [c] index into internal_nodes
    child_rank: torch.Tensor  # [c]
    top_k: int


@dataclass(frozen=True)
class SequentialTreePlan:
    """A tree laid out for depth-by-depth drafting (built once per engine)."""

    num_nodes: int
    levels: tuple[TreeLevel, ...]
    prefix_depth: tuple[int, ...]  # [n + 1]: deepest node among the first n nodes

    @classmethod
    def build(cls, tree: MedusaTree, device: torch.device | str = "cpu") -> SequentialTreePlan:
        parents, depths = tree.parents, tree.depths
        ranks = [0] + [p[-1] for p in tree.paths]
        levels, prev_internal = [], [0]
        for depth in range(tree.depth):
            internal = [m for m in range(len(depths)) if depths[m] == depth and m in parents[1:]]
            children = [m for m in range(1, len(depths)) if depths[m] == depth + 1]
            slot = {m: i for i, m in enumerate(internal)}
            prev_slot = {m: i for i, m in enumerate(prev_internal)}
            levels.append(
                TreeLevel(
                    depth=depth,
                    internal_nodes=_long(internal, device),
                    internal_parent_slot=_long(
                        [prev_slot.get(parents[m], 0) for m in internal], device
                    ),
                    children=_long(children, device),
                    child_slot=_long([slot[parents[m]] for m in children], device),
                    child_rank=_long([ranks[m] for m in children], device),
                    top_k=max(ranks[m] for m in children) + 1,
                )
            )
            prev_internal = internal
        prefix_depth = tuple(max(depths[: n + 1]) for n in range(len(depths)))
        return cls(tree.num_nodes, tuple(levels), prefix_depth)

    def depth_of_prefix(self, num_nodes: int) -> int:
        return self.prefix_depth[num_nodes]


def _long(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def check_draft_vocab(ids: torch.Tensor, config: SequentialConfig) -> torch.Tensor:
    """Draft vocabulary ids must be distinct, ascending, in ``[0, vocab_size)``."""
    ids = torch.as_tensor(ids).to(torch.long).reshape(-1)
    if ids.numel() != config.draft_vocab_size:
        raise ValueError(
            f"draft vocabulary has {ids.numel()} ids but draft_vocab_size is "
            f"{config.draft_vocab_size}"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        raise ValueError(f"draft vocabulary ids must be in [0, {config.vocab_size})")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("draft vocabulary ids must be strictly ascending (no duplicates)")
    return ids


def frequent_draft_vocab(targets: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids among ``targets`` (ascending)."""
    counts = torch.bincount(targets[targets >= 0].reshape(-1), minlength=vocab_size)
    return counts.topk(min(size, vocab_size)).indices.sort().values


def draft_vocab_coverage(targets: torch.Tensor, sizes: list[int], vocab_size: int) -> dict:
    """Fraction of ``targets`` inside the top-V most frequent ids, for each V."""
    valid = targets[targets >= 0].reshape(-1)
    counts = torch.bincount(valid, minlength=vocab_size).sort(descending=True).values
    cum = counts.cumsum(0).double() / max(valid.numel(), 1)
    return {v: round(float(cum[min(v, vocab_size) - 1]), 4) for v in sizes}


# ---- checkpoint ------------------------------------------------------------------------


class SequentialCheckpointError(ValueError):
    pass


def save_sequential_heads(
    heads: SequentialHeads,
    path: str | Path,
    tree: list[list[int]] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Write a sequential heads folder (``weights_dtype`` e.g. fp16 halves its size)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in list(heads.named_parameters()) + [("draft_token_ids", heads.draft_token_ids)]:
        t = t.detach().cpu()
        if weights_dtype is not None and t.is_floating_point():
            t = t.to(weights_dtype)
        tensors[name] = t.contiguous().clone()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": SEQUENTIAL_FORMAT})
    meta = heads.config.to_dict() | {
        "format": SEQUENTIAL_FORMAT,
        "format_version": SEQUENTIAL_FORMAT_VERSION,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tree is not None:
        (folder / "tree.json").write_text(json.dumps({"paths": tree}) + "\n")
    return folder


def load_sequential_heads(
    folder: str | Path,
    raw: dict | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    expected_hidden_size: int | None = None,
    expected_vocab_size: int | None = None,
) -> SequentialHeads:
    """Load a sequential heads folder, checking every tensor's shape against the config
    and the base model's sizes."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if raw is None:
        raw = json.loads(config_file.read_text())
    if raw.get("format_version") != SEQUENTIAL_FORMAT_VERSION:
        raise SequentialCheckpointError(
            f"{config_file} has format_version {raw.get('format_version')!r}; this reader "
            f"knows {SEQUENTIAL_FORMAT_VERSION}"
        )
    try:
        config = SequentialConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise SequentialCheckpointError(f"{config_file}: {e}") from e
    for name, expected in (
        ("hidden_size", expected_hidden_size),
        ("vocab_size", expected_vocab_size),
    ):
        if expected is not None and getattr(config, name) != expected:
            raise SequentialCheckpointError(
                f"{folder}: heads have {name} {getattr(config, name)} but the base model has "
                f"{expected}"
            )
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise SequentialCheckpointError(f"{folder}: weight file missing, looked for {weights_file}")
    tensors = load_file(str(weights_file))
    k, n_layers, h, v = (
        config.num_heads,
        config.num_layers,
        config.hidden_size,
        config.draft_vocab_size,
    )
    shapes = {
        "in_proj_weight": (k, h, 2 * h),
        "in_proj_bias": (k, h),
        "block_weight": (k, n_layers, h, h),
        "block_bias": (k, n_layers, h),
        "draft_lm_head": (v, h),
        "draft_token_ids": (v,),
    }
    if set(tensors) != set(shapes):
        raise SequentialCheckpointError(
            f"{weights_file}: expected tensors {sorted(shapes)}, found {sorted(tensors)}"
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise SequentialCheckpointError(
                f"{weights_file}: {name} has shape {tuple(tensors[name].shape)}, expected "
                f"{shape} from {config_file}"
            )
    try:
        heads = SequentialHeads(config, tensors.pop("draft_token_ids"), dtype=dtype)
    except ValueError as e:
        raise SequentialCheckpointError(f"{weights_file}: {e}") from e
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(heads, name).copy_(t.to(dtype))
    return heads


def is_sequential_config(raw: dict) -> bool:
    return raw.get("format") == SEQUENTIAL_FORMAT
