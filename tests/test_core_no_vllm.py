"""The pure-PyTorch core (and training) must work with vLLM absent.

vLLM is hidden from child interpreters by a ``sitecustomize`` module on ``PYTHONPATH`` that
wraps every ``sys.meta_path`` finder so that none finds ``vllm`` or ``vllm.*``: ``import vllm``
raises ModuleNotFoundError (an ImportError) and ``importlib.util.find_spec("vllm")`` is None,
exactly as when vLLM is not installed (tests that ``importorskip("vllm")`` then skip).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCKER = '''
import importlib.abc
import sys


def _is_vllm(fullname):
    return fullname == "vllm" or fullname.startswith("vllm.")


class _WithoutVllm(importlib.abc.MetaPathFinder):
    """Wraps a meta-path finder so that it never finds vLLM: to every importer (``import``,
    ``importlib.util.find_spec``) vLLM then looks exactly as if it were not installed."""

    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, fullname, path=None, target=None):
        find = getattr(self._inner, "find_spec", None)
        if find is None or _is_vllm(fullname):
            return None
        return find(fullname, path, target)

    def invalidate_caches(self):
        invalidate = getattr(self._inner, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()

    def __getattr__(self, name):  # find_distributions and friends
        return getattr(self._inner, name)


sys.meta_path[:] = [_WithoutVllm(finder) for finder in sys.meta_path]
for _name in [m for m in sys.modules if _is_vllm(m)]:
    del sys.modules[_name]
'''

CHECK_SCRIPT = textwrap.dedent(
    """
    import importlib
    import importlib.util
    import pkgutil
    import sys

    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the vLLM blocker is not active")

    import vllm_medusa.core

    modules = ["vllm_medusa", "vllm_medusa.core"] + [
        m.name for m in pkgutil.walk_packages(vllm_medusa.core.__path__, "vllm_medusa.core.")
    ]
    if importlib.util.find_spec("vllm_medusa.training") is not None:
        import vllm_medusa.training

        modules.append("vllm_medusa.training")
        modules += [
            m.name
            for m in pkgutil.walk_packages(vllm_medusa.training.__path__, "vllm_medusa.training.")
        ]
    for name in modules:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
    assert not leaked, leaked

    # a tiny end-to-end step: heads -> top-k -> tree fill -> acceptance
    import torch

    from vllm_medusa.core.acceptance import greedy_accept, typical_accept
    from vllm_medusa.core.heads import MedusaConfig, MedusaHeads
    from vllm_medusa.core.tree import MedusaTree

    torch.manual_seed(0)
    hidden, vocab, batch = 16, 24, 3
    tree = MedusaTree.resolve("mc_sim_7b_63", num_heads=4, top_k=10)
    heads = MedusaHeads(MedusaConfig(hidden, vocab, num_heads=4, num_layers=1))
    heads.init_from_base_lm_head(torch.randn(vocab, hidden))
    candidates = heads.topk(torch.randn(batch, hidden), tree.top_k)
    assert candidates.shape == (batch, 4, 10)
    buffers = tree.buffers()
    node_tokens = torch.cat(
        [torch.randint(0, vocab, (batch, 1)), buffers.fill(candidates)], dim=1
    )
    logits = torch.randn(batch, tree.num_nodes + 1, vocab)
    out = greedy_accept(node_tokens, logits, buffers).output_tokens()
    assert len(out) == batch and all(1 <= len(o) <= tree.depth + 1 for o in out)
    out = typical_accept(node_tokens, logits, buffers, temperature=0.7).output_tokens()
    assert len(out) == batch and all(1 <= len(o) <= tree.depth + 1 for o in out)
    print("MODULES", " ".join(modules))
    print("CORE CHECK PASSED", flush=True)

    # then the core test files, in this same vLLM-less interpreter (arguments: pytest's)
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def hidden_vllm_env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("hide_vllm")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(site), str(REPO), env.get("PYTHONPATH", "")) if p
    )
    env["OMP_NUM_THREADS"] = "1"
    env["VLLM_MEDUSA_TEST_EXAMPLES"] = "20"  # a re-run: fewer hypothesis examples
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_blocker_hides_vllm(hidden_vllm_env):
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('vllm') is None\n"
        "try:\n"
        "    import vllm.model_executor\n"
        "except ModuleNotFoundError as e:\n"
        "    print('BLOCKED', e.name)\n"
        "import json, importlib.metadata\n"  # everything else still imports
    )
    proc = run(["-c", script], hidden_vllm_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["BLOCKED", "vllm"]


@pytest.fixture(scope="module")
def hidden_run(hidden_vllm_env) -> subprocess.CompletedProcess:
    """One interpreter with vLLM hidden: imports and an end-to-end step, then pytest on the
    core test files (one interpreter start and one torch import for both checks)."""
    files = ["tests/test_tree.py", "tests/test_acceptance.py", "tests/test_heads.py"]
    if (REPO / "tests" / "test_checkpoint.py").exists():
        files.append("tests/test_checkpoint.py")
    pytest_args = ["-q", "-x", "-p", "no:cacheprovider", "--noconftest", *files]
    return run(["-c", CHECK_SCRIPT, *pytest_args], hidden_vllm_env, timeout=600)


def test_core_imports_and_runs_without_vllm(hidden_run):
    out = hidden_run.stdout
    assert "CORE CHECK PASSED" in out, out[-3000:] + hidden_run.stderr[-6000:]
    modules = out.split("MODULES", 1)[1].split("CORE CHECK PASSED", 1)[0].split()
    for expected in (
        "vllm_medusa.core.heads",
        "vllm_medusa.core.tree",
        "vllm_medusa.core.acceptance",
    ):
        assert expected in modules


def test_core_tests_pass_without_vllm(hidden_run):
    out = hidden_run.stdout
    assert "CORE CHECK PASSED" in out, hidden_run.stderr[-6000:]
    assert hidden_run.returncode == 0, out[-6000:] + hidden_run.stderr[-3000:]
    assert " passed" in out.split("CORE CHECK PASSED", 1)[1]
