"""Shared helpers for the tests that run vLLM engines (each in its own subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_medusa.engine_job import run_in_subprocess
from vllm_medusa.paths import assets_dir, cache_dir

SHIPPED_HEADS = assets_dir() / "heads" / "smollm2-135m-instruct"  # sequential heads
SHIPPED_MEDUSA1_HEADS = assets_dir() / "heads" / "smollm2-135m-instruct-medusa1"


def run_engine_job(job: dict, workdir: Path, name: str, env: dict | None = None) -> dict:
    """Run ``engine_job.py`` on ``job`` in a fresh process; return its JSON output."""
    proc, out_file = run_in_subprocess(job, workdir, name, env, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"engine job {name} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out_file.read_text())


def run_engine_job_expecting_failure(job: dict, workdir: Path, name: str) -> str:
    """Run a job that must fail at engine start; return its stderr."""
    proc, _ = run_in_subprocess(job, workdir, name, timeout=600)
    assert proc.returncode != 0, f"engine job {name} was expected to fail but succeeded"
    return proc.stderr


def first_divergence(a: list[list[int]], b: list[list[int]]) -> str:
    """A readable description of the first place two batches of outputs differ."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            k = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return f"prompt {i}: first difference at token {k}: {x[k : k + 5]} vs {y[k : k + 5]}"
    return "identical"


def fixture_dir(name: str) -> Path:
    path = cache_dir() / "test-fixtures" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
