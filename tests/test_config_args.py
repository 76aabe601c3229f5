"""``num_speculative_tokens`` may be left out: the plugin derives it from the tree.

Each case builds vLLM's engine config in a fresh process, as ``LLM(...)`` and the OpenAI
server do (no engine starts): the ``vllm.general_plugins`` entry point must have installed the
patch before the speculative config is built.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

LLM_PATH = """
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=MODEL, dtype="float32", max_model_len=512, **KWARGS)
    print("K", args.create_engine_config().speculative_config.num_speculative_tokens)
"""

SERVER_PATH = """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", MODEL, "--dtype", "float32", "--max-model-len", "512"]
    for key, value in KWARGS.items():
        argv += ["--" + key.replace("_", "-"), json.dumps(value)]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    print("K", config.speculative_config.num_speculative_tokens)
"""


def _build_config(code: str, model, kwargs: dict) -> subprocess.CompletedProcess:
    script = f"import json\nMODEL = {str(model)!r}\nKWARGS = json.loads({json.dumps(kwargs)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize("path", ["llm", "server"])
def test_num_speculative_tokens_comes_from_the_tree(smollm2_dir, oracle_heads, path):
    kwargs = {
        "speculative_config": {"method": "medusa", "model": str(oracle_heads)},
        "additional_config": {"medusa": {"tree": "mc_sim_7b_63"}},
    }
    proc = _build_config(LLM_PATH if path == "llm" else SERVER_PATH, smollm2_dir, kwargs)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "K 63" in proc.stdout.splitlines(), proc.stdout
