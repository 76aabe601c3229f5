"""Where vllm-medusa keeps prepared models and other cached artefacts."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VLLM_MEDUSA_CACHE"


def cache_dir() -> Path:
    """The user cache directory, overridable by ``$VLLM_MEDUSA_CACHE``."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-medusa"
    root.mkdir(parents=True, exist_ok=True)
    return root


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def assets_dir() -> Path:
    """Files shipped inside the package (trained heads, trees)."""
    return Path(__file__).resolve().parent / "assets"


SHIPPED_HEADS = "smollm2-135m-instruct"  # sequential heads: the default for serving
# Medusa-1 heads for the same model: what vLLM's own chain Medusa can load (comparisons).
SHIPPED_MEDUSA1_HEADS = "smollm2-135m-instruct-medusa1"


def shipped_heads_dir(name: str = SHIPPED_HEADS) -> Path:
    """Heads shipped for SmolLM2-135M-Instruct (trained by this project's commands)."""
    path = assets_dir() / "heads" / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no shipped heads at {path}")
    return path
