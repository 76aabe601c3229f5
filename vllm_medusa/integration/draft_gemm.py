"""Drafting's dense products on vLLM's prepacked CPU GEMM (oneDNN).

At a handful of rows (one request's internal tree nodes) ``F.linear`` on a CPU core is
memory- and dispatch-bound: the sequential heads' 8K-row draft LM head took ~2 ms per depth
for three rows. vLLM packs its own linear layers for oneDNN once at load
(``dispatch_cpu_unquantized_gemm``); the same handler runs the heads' products 3-5x faster
(``benchmarks/README.md``). Other devices keep ``F.linear``.

``VLLM_MEDUSA_DRAFT_GEMM=torch`` keeps ``F.linear`` on CPU too (before/after measurements).
"""

from __future__ import annotations

import os

import torch

from vllm_medusa.core.sequential_heads import Linear, MakeLinear

DRAFT_GEMM_ENV = "VLLM_MEDUSA_DRAFT_GEMM"  # "onednn" (default on CPU) or "torch"


def draft_gemm_mode() -> str:
    mode = os.environ.get(DRAFT_GEMM_ENV, "onednn")
    if mode not in ("onednn", "torch"):
        raise ValueError(f"{DRAFT_GEMM_ENV} must be 'onednn' or 'torch', not {mode!r}")
    return mode


def prepacked_linear_factory(device: torch.device) -> MakeLinear | None:
    """A builder of oneDNN-prepacked linears for ``device``, or None where ``F.linear`` stays
    (not a CPU, no oneDNN in this vLLM build, or turned off by ``$VLLM_MEDUSA_DRAFT_GEMM``)."""
    if device.type != "cpu" or draft_gemm_mode() == "torch":
        return None
    from vllm import _custom_ops as ops
    from vllm.platforms import CpuArchEnum, current_platform

    # The same conditions under which vLLM packs its own linear layers for oneDNN.
    if not ops._supports_onednn or current_platform.get_cpu_architecture() == CpuArchEnum.POWERPC:
        return None

    def make(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        handler = ops.create_onednn_mm(weight.detach().t(), 32)  # packs its own copy, [in, out]
        b = None if bias is None else bias.detach().contiguous()

        def linear(x: torch.Tensor) -> torch.Tensor:
            return ops.onednn_mm(handler, x.contiguous(), b)

        return linear

    return make
