from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Prompts whose continuation the oracle heads memorise (outside MT-Bench's first turns).
ORACLE_PROMPTS = [
    "Write a short poem about the sea.",
    "List three uses of copper.",
    "Explain what a prime number is.",
    "Give two tips for learning to cook.",
]
ORACLE_MAX_TOKENS = 48


@pytest.fixture(scope="session")
def smollm2_dir():
    from vllm_medusa.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def oracle_heads(smollm2_dir):
    """Heads that know the greedy continuation of ORACLE_PROMPTS (fitted once, cached)."""
    from tests.oracle_heads import fit_oracle_heads
    from tests.vllm_jobs import fixture_dir

    out = fixture_dir("oracle-heads-v1")
    if not (out / "heads.safetensors").exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fit_oracle_heads(smollm2_dir, ORACLE_PROMPTS, tmp, max_new_tokens=ORACLE_MAX_TOKENS)
        tmp.rename(out)
    return out
