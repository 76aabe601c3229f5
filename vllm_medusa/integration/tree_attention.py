"""Tree attention on vLLM's CPU paged KV cache.

vLLM's CPU attention kernel masks by index only: query ``i`` of a request sees KV
``[0, seq_len - q_len + i]``. For a flattened tree that is right for every node whose
ancestors are exactly the nodes before it (the root, the first child, and every node of a
chain) and wrong for the others, which must see only the cached prefix, their ancestors and
themselves. The backend below lets the kernel compute the whole batch as usual (prefills,
plain decodes and trees alike), then recomputes just the rows the kernel gets wrong, with
an explicit ancestor mask over the request's K/V read back from the paged cache.

The runner patch publishes a :class:`TreeAttentionPlan` for the current step (module state,
per process); without a plan the backend is exactly vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_medusa.integration.options import MedusaConfigError

# ISAs whose K/V packing inside a page was checked by :func:`check_kv_layout` (at engine
# start, from :func:`vllm_medusa.integration.startup_checks.check_model`).
_LAYOUT_CHECKED: set[str] = set()


class KVCacheLayoutError(MedusaConfigError):
    """vLLM's CPU cache writer packs K/V in a page differently from what tree attention reads."""


@dataclass
class TreeAttentionPlan:
    """The rows one forward pass must recompute with a tree mask.

    R tree requests, up to M rows to fix and up to P pages (of ``block_size`` keys) per
    request: ``q_rows`` ``[R, M]`` global token rows (padding: 0), ``q_valid`` ``[R, M]``,
    ``kv_blocks`` ``[R, P]`` the request's KV-cache blocks in position order (padding: 0),
    ``mask`` ``[R, 1, M, P * block_size]`` bool (True = may attend; keys past the request's
    last position are masked).
    """

    q_rows: torch.Tensor
    q_valid: torch.Tensor
    kv_blocks: torch.Tensor
    mask: torch.Tensor


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


class TreeCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
        )
        plan = _current_plan
        if plan is None or attn_metadata is None or self.attn_type != "decoder":
            return output
        check_kv_layout(layer, kv_cache)
        self._recompute_tree_rows(plan, query, kv_cache, output)
        return output

    def _recompute_tree_rows(self, plan, query, kv_cache, output) -> None:
        r, m = plan.q_rows.shape
        p = plan.kv_blocks.shape[1]
        # Whole pages, gathered along the block axis (contiguous copies; an element-wise
        # gather of every slot costs several times more).
        k_pages, v_pages = _kv_views(kv_cache)  # [nb, Hkv, D, bs], [nb, Hkv, bs, D]
        blocks = plan.kv_blocks.reshape(-1)
        k = k_pages[blocks].view(r, p, self.num_kv_heads, self.head_size, -1)
        k = k.permute(0, 2, 1, 4, 3).reshape(r, self.num_kv_heads, -1, self.head_size)
        v = v_pages[blocks].view(r, p, self.num_kv_heads, -1, self.head_size)
        v = v.transpose(1, 2).reshape(r, self.num_kv_heads, -1, self.head_size)
        q = query[plan.q_rows.reshape(-1)].view(r, m, self.num_heads, self.head_size)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).to(k.dtype),
            k,
            v,
            attn_mask=plan.mask,
            scale=self.scale,
            enable_gqa=self.num_queries_per_kv > 1,
        )  # [R, H, M, D]
        out = out.transpose(1, 2)[plan.q_valid]  # [rows, H, D]
        rows = plan.q_rows[plan.q_valid]
        output.view(output.shape[0], self.num_heads, self.head_size)[rows] = out.to(output.dtype)


class TreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionBackendImpl]:
        return TreeCPUAttentionBackendImpl


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
