"""``vllm-medusa`` command-line errors: one line naming the problem, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_medusa.cli import main
from vllm_medusa.core.checkpoint import save_heads
from vllm_medusa.core.heads import MedusaConfig, MedusaHeads


@pytest.fixture
def heads_dir(tmp_path):
    heads = MedusaHeads(MedusaConfig(hidden_size=8, vocab_size=16, num_heads=2))
    return save_heads(heads, tmp_path / "heads")


def _serve(heads, *tree):
    return ["serve", "model", "--medusa-heads", str(heads), *tree, "--print-flags"]


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (["--medusa-tree", "[[0], [0, 0"], "--medusa-tree is not valid JSON"),
        (["--medusa-tree", "[[0], [0, 0, 0]]"], "has no parent"),
        (["--medusa-tree", "chain-3"], "only 2 Medusa heads"),
        (["--medusa-tree", "no_such_tree"], "unknown tree preset 'no_such_tree'"),
    ],
)
def test_bad_trees_fail_in_one_line(heads_dir, capsys, tree, message):
    assert main(_serve(heads_dir, *tree)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vllm-medusa serve: error: "), err
    assert message in err


def test_missing_heads_fail_in_one_line(tmp_path, capsys):
    assert main(_serve(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere is not a folder" in err, err


def test_the_command_prints_no_traceback(heads_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_medusa.cli", *_serve(heads_dir, "--medusa-tree", "[[0]")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if "error: --medusa-tree" in line
    ], proc.stderr
