"""Tree attention on vLLM's CPU paged KV cache.

vLLM's CPU attention kernel masks by index only: query ``i`` of a request sees KV
``[0, seq_len - q_len + i]``. For a flattened tree that is right for the leading nodes whose
ancestors are exactly the nodes before them (the root, the first child, a leading chain) and
wrong from the first node that is not. Per step and request, the kernel therefore computes only
those leading rows (prefills and plain decodes as usual: the metadata builder below trims each
verifying request's query and sequence lengths), and the compiled fix-up computes the other
tree rows with an explicit ancestor mask over the request's K/V read from the paged cache.

The runner patch publishes a :class:`TreeAttentionPlan` for the current step (module state,
per process); without a plan the backend is exactly vLLM's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_medusa.integration import tree_kernels
from vllm_medusa.integration.options import MedusaConfigError

# ISAs whose K/V packing inside a page was checked by :func:`check_kv_layout` (at engine
# start, from :func:`vllm_medusa.integration.startup_checks.check_model`).
_LAYOUT_CHECKED: set[str] = set()


class KVCacheLayoutError(MedusaConfigError):
    """vLLM's CPU cache writer packs K/V in a page differently from what tree attention reads."""


@dataclass
class TreeAttentionPlan:
    """The rows one forward pass must recompute with a tree mask.

    F rows to fix, each a tree node of one request: ``rows`` ``[F]`` global token rows,
    ``prefix_len`` ``[F]`` the request's cached prefix (keys ``[0, prefix_len)`` all visible),
    ``tree_keys`` ``[F, A]`` the key positions of the root, the node's ancestors and the node
    itself (``-1`` padding), ``blocks`` ``[F, P]`` the request's KV-cache blocks in position
    order (a key at position ``p`` lives in block ``blocks[f, p // block_size]``).
    A request's rows are consecutive: ``request_rows`` ``[R + 1]`` offsets, rows
    ``[request_rows[i], request_rows[i + 1])`` belong to the i-th request with rows to fix (the
    compiled kernel reads each of its prefix pages once for all of them).
    """

    rows: torch.Tensor
    prefix_len: torch.Tensor
    tree_keys: torch.Tensor
    blocks: torch.Tensor
    request_rows: torch.Tensor
    # [B] host: how many of each request's last query rows are plan rows (vLLM's kernel skips
    # them; see TreeCPUAttentionMetadataBuilder).
    rows_per_request: np.ndarray


class TreeMaskLayout:
    """Per-tree constants for building plans: which nodes the tree kernel computes (every node
    from the first one the causal kernel gets wrong), and each node's visible tree nodes
    (root, ancestors, itself) as a padded table."""

    def __init__(self, ancestor_mask: np.ndarray):
        # ancestor_mask [N+1, N+1] bool: row j = nodes node j may see (root = node 0).
        n = ancestor_mask.shape[0]
        # Node j is exact under the index-causal mask when its visible nodes are exactly the
        # nodes before it (root, first child, chains). The causal kernel keeps the leading exact
        # nodes; from the first inexact one on, every node is the tree kernel's, so that a
        # request's kernel rows stay a prefix of its query (breadth-first trees: no node after
        # the first inexact one is exact anyway).
        causal_exact = np.array([ancestor_mask[j, : j + 1].all() for j in range(n)])
        inexact = np.nonzero(~causal_exact)[0]
        first = int(inexact[0]) if len(inexact) else n
        self.fix_nodes = np.arange(first, n, dtype=np.int64)  # ascending node ids
        width = int(ancestor_mask.sum(axis=1).max())
        self.visible = np.full((n, width), -1, dtype=np.int64)  # [N+1, A]
        for j in range(n):
            nodes = np.nonzero(ancestor_mask[j])[0]
            self.visible[j, : len(nodes)] = nodes

    def plan(
        self,
        root_rows: np.ndarray,
        root_pos: np.ndarray,
        num_draft: np.ndarray,
        block_table: np.ndarray,
        block_size: int,
        device,
    ) -> TreeAttentionPlan | None:
        """The plan for one step: ``root_rows``, ``root_pos``, ``num_draft`` ``[B]`` per request
        (global row and position of the tree root, drafted nodes), ``block_table``
        ``[>=B, max_blocks]``. No Python loop over requests or nodes."""
        counts = np.searchsorted(self.fix_nodes, num_draft, side="right")  # [B]
        total = int(counts.sum())
        if total == 0:
            return None
        req = np.repeat(np.arange(len(num_draft)), counts)  # [F]
        first = np.cumsum(counts) - counts
        node = self.fix_nodes[np.arange(total) - first[req]]  # [F]
        ctx = root_pos[req]
        visible = self.visible[node]  # [F, A]
        tree_keys = np.where(visible >= 0, ctx[:, None] + visible, -1)
        pages = int((root_pos[req] + num_draft[req]).max()) // block_size + 1

        def tensor(x: np.ndarray) -> torch.Tensor:  # the kernels take contiguous int64
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(device)

        return TreeAttentionPlan(
            rows=tensor(root_rows[req] + node),
            prefix_len=tensor(ctx),
            tree_keys=tensor(tree_keys),
            blocks=tensor(block_table[req, :pages]),
            request_rows=tensor(np.concatenate([[0], np.cumsum(counts[counts > 0])])),
            rows_per_request=counts.astype(np.int64),
        )


_current_plan: TreeAttentionPlan | None = None


def set_plan(plan: TreeAttentionPlan | None) -> None:
    global _current_plan
    _current_plan = plan


def get_plan() -> TreeAttentionPlan | None:
    return _current_plan


# ---- K/V access in a CPU page ([num_blocks, kv_heads, block_size, 2 * head_size]) ----------
# Each (block, head) page holds K then V. K is stored column-major ([head_size, block_size]),
# V row-major ([block_size, head_size]); checked against the kernel's writer at engine start.


def _kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    pages = kv_cache.view(nb, h, 2, bs * d)
    return pages[:, :, 0].view(nb, h, d, bs), pages[:, :, 1].view(nb, h, bs, d)


def read_kv(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[S, kv_heads, head_size]`` stored at paged-cache ``slots`` ``[S]``."""
    block_size = kv_cache.shape[2]
    k_pages, v_pages = _kv_views(kv_cache)
    blocks, offsets = slots // block_size, slots % block_size
    return k_pages[blocks, :, :, offsets], v_pages[blocks, :, offsets, :]


def write_kv(
    layer, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write K/V ``[S, kv_heads, head_size]`` at ``slots`` with vLLM's own cache writer."""
    nb, h, bs, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        key.contiguous(),
        value.contiguous(),
        key_cache,
        value_cache,
        slots,
        layer.isa,
        k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float,
        kv_cache_dtype=layer.kv_cache_dtype,
    )


def check_kv_layout(layer, kv_cache: torch.Tensor) -> None:
    """Fail loudly if this ISA packs K/V differently from what :func:`read_kv` assumes."""
    isa = layer.isa
    if isa in _LAYOUT_CHECKED:
        return
    _, h, bs, d2 = kv_cache.shape
    scratch = torch.zeros((2, h, bs, d2), dtype=kv_cache.dtype)
    slots = torch.tensor([0, 3, bs + 1, 2 * bs - 1], dtype=torch.long)
    key = torch.randn(len(slots), h, d2 // 2).to(kv_cache.dtype)
    value = torch.randn(len(slots), h, d2 // 2).to(kv_cache.dtype)
    write_kv(layer, scratch, key, value, slots)
    k_back, v_back = read_kv(scratch, slots)
    if not (torch.equal(k_back, key) and torch.equal(v_back, value)):
        raise KVCacheLayoutError(
            f"vllm-medusa tree attention does not know the CPU KV-cache packing of ISA {isa!r} "
            f"(dtype {kv_cache.dtype}); tree attention is verified for the 'vec'/'vec16' "
            "packing only. Use a chain tree or report the ISA."
        )
    _LAYOUT_CHECKED.add(isa)


@dataclass
class TrimmedAttention:
    """vLLM's kernel call without the plan rows: the ``rows`` ``[T']`` it still computes, and
    metadata whose query / sequence lengths end before each request's plan rows."""

    rows: torch.Tensor
    metadata: object


def trimmed_lengths(
    query_start_loc: np.ndarray, seq_lens: np.ndarray, rows_per_request: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop each request's last ``rows_per_request`` query rows: (kept rows ``[T']``, query
    start offsets ``[B+1]``, sequence lengths ``[B]``). The kept rows keep their causal
    limits: a request's query row ``i`` still sees keys ``[0, seq_len - q_len + i]``."""
    q_lens = np.diff(query_start_loc)
    kept_lens = q_lens - rows_per_request
    starts = query_start_loc[:-1]
    kept = np.repeat(starts, kept_lens) + (
        np.arange(int(kept_lens.sum())) - np.repeat(np.cumsum(kept_lens) - kept_lens, kept_lens)
    )
    new_start_loc = np.concatenate([[0], np.cumsum(kept_lens)])
    return kept, new_start_loc, seq_lens - rows_per_request


class TreeCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata, plus (when this step has a plan) a trimmed copy that keeps vLLM's
    kernel off the rows the tree kernel computes anyway (they would be computed twice)."""

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = _current_plan
        metadata.vllm_medusa_trimmed = None
        if (
            plan is None
            or self.is_cross_attention
            or self.is_encoder_only_attention
            or metadata.causal is not True
            or metadata.dynamic_causal is not None
            or len(plan.rows_per_request) != common_attn_metadata.num_reqs
        ):
            return metadata  # vLLM computes every row; the fix-up still overwrites the plan's
        start_loc = metadata.query_start_loc.cpu().numpy().astype(np.int64)
        seq_lens = metadata.seq_lens.cpu().numpy().astype(np.int64)
        num_reqs = common_attn_metadata.num_reqs
        kept, new_start_loc, new_seq_lens = trimmed_lengths(
            start_loc[: num_reqs + 1], seq_lens[:num_reqs], plan.rows_per_request
        )
        device = metadata.query_start_loc.device
        query_start_loc = torch.from_numpy(new_start_loc).to(
            device=device, dtype=metadata.query_start_loc.dtype
        )
        seq_lens_t = torch.from_numpy(new_seq_lens).to(device=device, dtype=metadata.seq_lens.dtype)
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=num_reqs,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            seq_lens=seq_lens_t,
            dtype=self.dtype,
            query_start_loc=query_start_loc,
            causal=True,
            sliding_window_size=self.window_size,
            isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        metadata.vllm_medusa_trimmed = TrimmedAttention(
            rows=torch.from_numpy(kept).to(device),
            metadata=dataclasses.replace(
                metadata,
                num_actual_tokens=len(kept),
                max_query_len=int(np.diff(new_start_loc).max()),
                query_start_loc=query_start_loc,
                max_seq_len=int(new_seq_lens.max()),
                seq_lens=seq_lens_t,
                scheduler_metadata=scheduler_metadata,
            ),
        )
        return metadata


class TreeCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        plan = _current_plan
        if plan is None or attn_metadata is None or self.attn_type != "decoder":
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
            )
        check_kv_layout(layer, kv_cache)
        trimmed = getattr(attn_metadata, "vllm_medusa_trimmed", None)
        if trimmed is None:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw)
        else:
            # vLLM's kernel on the rows it gets right (K/V were written for every row before).
            kept_out = output.new_empty((len(trimmed.rows), *output.shape[1:]))
            super().forward(
                layer, query[trimmed.rows], key, value, kv_cache, trimmed.metadata, kept_out,
                *args, **kw,
            )  # fmt: skip
            output[trimmed.rows] = kept_out
        self._recompute_tree_rows(plan, query, kv_cache, output)
        return output

    def _recompute_tree_rows(self, plan, query, kv_cache, output) -> None:
        out = output.view(output.shape[0], self.num_heads * self.head_size)
        recompute_tree_rows(plan, query, kv_cache, out, self.num_heads, self.scale)


def recompute_tree_rows(plan, query, kv_cache, out, num_heads: int, scale: float) -> None:
    """Overwrite the plan's rows of ``out`` ``[T, H * D]`` with their tree-masked attention:
    the compiled kernel, or the PyTorch reference (``VLLM_MEDUSA_TREE_KERNELS=torch``)."""
    query = query.view(query.shape[0], num_heads, -1)
    if tree_kernels.use_compiled():
        tree_kernels.compiled().tree_attention_rows(
            query,
            kv_cache,
            out,
            plan.rows,
            plan.blocks,
            plan.prefix_len,
            plan.tree_keys,
            plan.request_rows,
            scale,
        )
        return
    out[plan.rows] = tree_rows_reference(plan, query, kv_cache, num_heads, scale).to(out.dtype)


def tree_rows_reference(plan, query, kv_cache, num_heads: int, scale: float) -> torch.Tensor:
    """The fixed rows ``[F, H * D]`` in plain PyTorch (the compiled kernel's reference)."""
    block_size = kv_cache.shape[2]
    f = plan.rows.shape[0]
    max_prefix = int(plan.prefix_len.max())
    # Key positions [F, K]: the prefix, then the tree keys; invalid ones masked.
    prefix = torch.arange(max_prefix, device=query.device).expand(f, -1)
    positions = torch.cat([prefix, plan.tree_keys], dim=1)
    valid = torch.cat([prefix < plan.prefix_len[:, None], plan.tree_keys >= 0], dim=1)
    positions = positions.clamp(min=0)
    blocks = torch.gather(plan.blocks, 1, positions // block_size)
    key, value = read_kv(kv_cache, (blocks * block_size + positions % block_size).reshape(-1))
    kv_heads, head_size = key.shape[1], key.shape[2]
    key = key.view(f, -1, kv_heads, head_size).transpose(1, 2)  # [F, Hkv, K, D]
    value = value.view(f, -1, kv_heads, head_size).transpose(1, 2)
    q = query.view(query.shape[0], num_heads, head_size)[plan.rows].unsqueeze(2)  # [F, H, 1, D]
    out = F.scaled_dot_product_attention(
        q.to(key.dtype),
        key,
        value,
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=num_heads != kv_heads,
    )  # [F, H, 1, D]
    return out.reshape(f, num_heads * head_size)


class TreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionBackendImpl]:
        return TreeCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[TreeCPUAttentionMetadataBuilder]:
        return TreeCPUAttentionMetadataBuilder


def register_tree_attention_backend() -> None:
    """Route vLLM's CPU_ATTN backend to the tree-aware subclass (CPU platform only)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(
        AttentionBackendEnum.CPU_ATTN,
        f"{TreeCPUAttentionBackend.__module__}.{TreeCPUAttentionBackend.__qualname__}",
    )
