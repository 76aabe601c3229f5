"""The compiled CPU kernels of tree attention (``csrc/tree_attention_cpu.cpp``).

Built once per machine with PyTorch's C++ extension loader (gcc + ninja; ~1 min, then
cached under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) when an engine
that serves a tree starts, so that a missing compiler fails at start, not at the first step.
``VLLM_MEDUSA_TREE_KERNELS=torch`` selects the pure-PyTorch implementation instead (slower:
a dozen ops per layer; kept as the reference the tests compare against).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

KERNELS_ENV = "VLLM_MEDUSA_TREE_KERNELS"  # "compiled" (default) or "torch"
_SOURCE = Path(__file__).with_name("csrc") / "tree_attention_cpu.cpp"
_lock = threading.Lock()
_module = None


def kernels_mode() -> str:
    mode = os.environ.get(KERNELS_ENV, "compiled")
    if mode not in ("compiled", "torch"):
        raise ValueError(f"{KERNELS_ENV} must be 'compiled' or 'torch', not {mode!r}")
    return mode


def compiled():
    """The built extension module (built on first use; errors name the cause)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            from torch.utils import cpp_extension

            # The build runs ninja from PATH; the venv's own (the ninja wheel vLLM installs)
            # is there only when the venv is activated.
            bin_dir = os.path.dirname(sys.executable)
            if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
            try:
                _module = cpp_extension.load(
                    name="vllm_medusa_tree_attention_cpu",
                    sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-march=native"],
                    verbose=False,
                )
            except Exception as e:  # compiler missing, headers missing, ...
                raise RuntimeError(
                    f"vllm-medusa could not build its CPU tree-attention kernels ({e}); "
                    f"install gcc/g++ and ninja, or set {KERNELS_ENV}=torch for the slower "
                    "pure-PyTorch implementation"
                ) from e
    return _module


def use_compiled() -> bool:
    return kernels_mode() == "compiled"


def argmax_rows(logits):
    """``logits.argmax(-1)`` (first maximum, as vLLM's greedy sampler picks it), by the compiled
    kernel for fp32 CPU logits (ATen's row argmax is the largest cost of tree acceptance)."""
    import torch

    if (
        use_compiled()
        and logits.device.type == "cpu"
        and logits.dim() == 2
        and logits.dtype == torch.float32
        and logits.stride(1) == 1
    ):
        return compiled().argmax_rows(logits)
    return logits.argmax(dim=-1)
