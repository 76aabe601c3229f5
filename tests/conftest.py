from __future__ import annotations

import os
import shutil
from pathlib import Path

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
# Rank of the true next token under the demoted oracle heads (decoys above it at every head):
# their text lies on the tree branch [2, 2, 2, 2], never on the rank-0 chain.
DEMOTED_RANK = 2


@pytest.fixture(scope="session")
def smollm2_dir():
    from vllm_medusa.models import default_model_path

    return default_model_path()


def _cached_fixture(name: str, fit, model_dir) -> Path:
    """A fitted fixture folder, fitted once per machine (then read from the cache)."""
    from tests.vllm_jobs import fixture_dir

    out = fixture_dir(name)
    if not (out / "heads.safetensors").exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fit(model_dir, ORACLE_PROMPTS, tmp, max_new_tokens=ORACLE_MAX_TOKENS)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def oracle_heads(smollm2_dir):
    """Heads that know the greedy continuation of ORACLE_PROMPTS (fitted once, cached)."""
    from tests.oracle_heads import fit_oracle_heads

    return _cached_fixture("oracle-heads-v1", fit_oracle_heads, smollm2_dir)


@pytest.fixture(scope="session")
def oracle_sequential_heads(smollm2_dir):
    """Sequential heads that know the greedy continuation of ORACLE_PROMPTS (cached)."""
    from tests.oracle_heads import fit_oracle_sequential_heads

    return _cached_fixture("oracle-sequential-heads-v1", fit_oracle_sequential_heads, smollm2_dir)


@pytest.fixture(scope="session")
def demoted_oracle_heads(smollm2_dir, oracle_heads):
    """The oracle heads, ranking the true token DEMOTED_RANK-th (derived, no training; cached)."""
    from tests.oracle_heads import demote_true_tokens

    def derive(model_dir, prompts, out, max_new_tokens):
        return demote_true_tokens(
            oracle_heads, model_dir, prompts, out, rank=DEMOTED_RANK, max_new_tokens=max_new_tokens
        )

    return _cached_fixture(f"oracle-heads-v1-rank{DEMOTED_RANK}", derive, smollm2_dir)
