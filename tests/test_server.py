"""``vllm-medusa serve``: vLLM's OpenAI server with tree Medusa, end to end over HTTP.

One server (SmolLM2 + oracle heads, tree ``mc_sim_7b_63``) serves greedy completions and chat
completions, plain and streamed; every answer must equal a plain vLLM engine's text exactly,
and ``/metrics`` must show the drafts and the deep acceptance the oracle heads give.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import ORACLE_MAX_TOKENS, ORACLE_PROMPTS
from tests.vllm_jobs import run_engine_job

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPT = ORACLE_PROMPTS[0]
TREE = "mc_sim_7b_63"
SERVED_NAME = "smollm2"
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 300


def _vllm_medusa() -> list[str]:
    """The installed ``vllm-medusa`` script (the module if the script is not beside Python)."""
    script = shutil.which("vllm-medusa", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "vllm_medusa.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group (API server + engine core), then kill."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server_process(smollm2_dir, oracle_heads, tmp_path_factory) -> Iterator[Server]:
    """The server, started (not yet ready); stopped with its process group at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    argv = [
        *_vllm_medusa(),
        "serve",
        # Options before MODEL: see test_print_flags for the MODEL-first order.
        "--medusa-heads",
        str(oracle_heads),
        "--medusa-tree",
        TREE,
        "--medusa-draft-budget",
        "full",  # deep acceptance below needs the whole tree every step
        str(smollm2_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--served-model-name",
        SERVED_NAME,
        "--enforce-eager",  # short requests: compiling (~70 s on CPU) would cost more
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", log)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def reference_text(server_process, smollm2_dir) -> str:
    """Plain vLLM's greedy answer to PROMPT (runs while the server starts up)."""
    out = run_engine_job(
        {
            "model": str(smollm2_dir),
            "engine": {"max_model_len": 2048, "enforce_eager": True},
            "prompts": [PROMPT],
            "sampling": {"temperature": 0, "max_tokens": ORACLE_MAX_TOKENS},
        },
        server_process.log.parent,
        "reference",
    )
    return out["texts"][0]


@pytest.fixture(scope="module")
def server(server_process, reference_text) -> Server:
    """The server once ``/health`` answers 200."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server_process.proc.poll() is not None:
            pytest.fail(
                f"server exited with rc {server_process.proc.returncode}:\n"
                + _log_tail(server_process.log)
            )
        try:
            if requests.get(f"{server_process.url}/health", timeout=5).status_code == 200:
                return server_process
        except requests.RequestException:
            pass
        time.sleep(2)
    pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n" + _log_tail(server_process.log))


@pytest.fixture(scope="module")
def chat_prompt(smollm2_dir) -> str:
    """PROMPT rendered with the chat template, exactly as the engine job renders it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )


def _post(server: Server, endpoint: str, body: dict, stream: bool = False) -> requests.Response:
    body = {"model": SERVED_NAME, "temperature": 0, "max_tokens": ORACLE_MAX_TOKENS, **body}
    if stream:
        body["stream"] = True
    resp = requests.post(
        f"{server.url}{endpoint}", json=body, stream=stream, timeout=REQUEST_TIMEOUT_S
    )
    assert resp.status_code == 200, f"{resp.status_code}: {resp.text}\n{_log_tail(server.log)}"
    return resp


def _sse_chunks(resp: requests.Response) -> Iterator[dict]:
    """The JSON chunks of a server-sent-events stream, up to ``data: [DONE]``."""
    done = False
    for line in resp.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            done = True
            break
        yield json.loads(data)
    assert done, "stream ended without data: [DONE]"


def test_completions(server, chat_prompt, reference_text):
    choice = _post(server, "/v1/completions", {"prompt": chat_prompt}).json()["choices"][0]
    assert choice["text"] == reference_text


def test_completions_streaming(server, chat_prompt, reference_text):
    resp = _post(server, "/v1/completions", {"prompt": chat_prompt}, stream=True)
    chunks = list(_sse_chunks(resp))
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == reference_text


def test_chat_completions(server, reference_text):
    messages = [{"role": "user", "content": PROMPT}]
    body = _post(server, "/v1/chat/completions", {"messages": messages}).json()
    assert body["choices"][0]["message"]["content"] == reference_text


def test_chat_completions_streaming(server, reference_text):
    messages = [{"role": "user", "content": PROMPT}]
    resp = _post(server, "/v1/chat/completions", {"messages": messages}, stream=True)
    deltas = [
        c["choices"][0]["delta"].get("content") or "" for c in _sse_chunks(resp) if c["choices"]
    ]
    assert "".join(deltas) == reference_text


def test_metrics_show_deep_acceptance(server, chat_prompt):
    from vllm_medusa.metrics import summarize_prometheus

    _post(server, "/v1/completions", {"prompt": chat_prompt})  # at least one request served
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    assert "vllm:spec_decode_num_drafts" in text
    summary = summarize_prometheus(text)
    assert summary.num_drafts > 0, summary
    # Oracle heads: memorised text, so whole tree paths (up to 4 drafts) are accepted.
    assert summary.tau > 2.0, summary.format()
    print(summary.format())


def test_per_request_acceptance_through_the_extra_body(server, chat_prompt):
    """``vllm_xargs`` reaches ``SamplingParams.extra_args``: a sampled request asks for exact
    tree rejection sampling (the server's default, greedy, gives sampled requests no drafts)
    and speculates; seeded, it reproduces; an unknown mode is a 400 naming it."""
    from vllm_medusa.metrics import summarize_prometheus

    def drafts() -> int:
        text = requests.get(f"{server.url}/metrics", timeout=30).text
        return summarize_prometheus(text).num_draft_tokens

    body = {"prompt": chat_prompt, "temperature": 0.8, "seed": 5, "max_tokens": 24}
    before = drafts()
    _post(server, "/v1/completions", body)
    assert drafts() == before  # sampled, greedy mode: plain decoding
    exact = {**body, "vllm_xargs": {"medusa_acceptance": "exact"}}
    texts = [_post(server, "/v1/completions", exact).json()["choices"][0]["text"] for _ in "ab"]
    assert drafts() > before
    assert texts[0] == texts[1] and texts[0]
    bad = {**body, "model": SERVED_NAME, "vllm_xargs": {"medusa_acceptance": "fastest"}}
    resp = requests.post(f"{server.url}/v1/completions", json=bad, timeout=REQUEST_TIMEOUT_S)
    assert resp.status_code == 400, resp.text
    assert "unknown medusa_acceptance 'fastest'" in resp.text


@pytest.mark.parametrize("model_first", [False, True], ids=["options-first", "model-first"])
def test_print_flags(smollm2_dir, oracle_heads, model_first):
    """``--print-flags`` prints the server command with the tree's draft count (63 nodes)."""
    own = ["--medusa-heads", str(oracle_heads), "--medusa-tree", TREE, "--print-flags"]
    model = [str(smollm2_dir)]
    args = [*model, *own] if model_first else [*own, *model]
    proc = subprocess.run(
        [*_vllm_medusa(), "serve", *args, "--max-model-len", "2048"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--speculative-config" in proc.stdout
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert "vllm.entrypoints.openai.api_server" in argv
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec["num_speculative_tokens"] == 63
    assert '"num_speculative_tokens": 63' in proc.stdout
    assert argv[argv.index("--max-model-len") + 1] == "2048"
