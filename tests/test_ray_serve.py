"""Ray Serve: tree-Medusa replicas behind one endpoint (``vllm_medusa.ray_deployment``).

Fast cases check the pure helpers (CPU binding, metrics aggregation, request checks, flag
handling). The slow cases start a local Ray cluster (loopback only), deploy 2 replicas
(SmolLM2 + oracle heads, tree ``mc_sim_7b_63``, one core each), and check over HTTP: concurrent
chat requests, plain and streamed, equal plain greedy decoding; bad input is a 4xx and the
replicas keep serving; ``/metrics`` sums the replicas' spec-decode counters (tau); a replica
killed mid-load is replaced by Serve and no request is lost. The cluster is shut down at the
end. A Ray worker loads the plugin as vLLM does and reports the patch ledger.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ORACLE_MAX_TOKENS, ORACLE_PROMPTS
from vllm_medusa.metrics import summarize_prometheus
from vllm_medusa.ray_serve import BadRequest, aggregate_prometheus, check_request_body
from vllm_medusa.ray_serve import replica_cpu_bind as cpu_bind
from vllm_medusa.serve import pop_host_port

SERVED_NAME = "smollm2"
TREE = "mc_sim_7b_63"
REQUEST_TIMEOUT_S = 180  # a request that takes longer counts as hanging
RETRYABLE = (500, 502, 503, 504)

# ----------------------------------------------------------------------------- fast cases


def test_replica_cpu_bind_gives_each_local_replica_its_own_cores():
    assert [cpu_bind(r, 1, [0, 1]) for r in range(3)] == ["0", "1", "0"]
    assert [cpu_bind(r, 2, [0, 1, 2, 3]) for r in range(2)] == ["0,1", "2,3"]
    assert cpu_bind(0, 4, [5, 6]) == "5,6"  # never more cores than there are
    with pytest.raises(ValueError):
        cpu_bind(0, 0, [0])


def test_aggregate_prometheus_sums_counters_and_keeps_metadata_once():
    def replica(drafts: int, accepted: int, pos0: int) -> str:
        return "\n".join(
            [
                "# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.",
                "# TYPE vllm:spec_decode_num_drafts counter",
                f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} {drafts}.0',
                f'vllm:spec_decode_num_drafts_created{{engine="0",model_name="m"}} {100 + drafts}',
                f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} {accepted}',
                f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="m",position="0"}} {pos0}',
                'vllm:cache_config_info{block_size="16"} 1.0',
            ]
        )

    text = aggregate_prometheus([replica(10, 25, 8), replica(30, 15, 12)])
    assert text.count("# TYPE vllm:spec_decode_num_drafts counter") == 1
    assert 'vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 110.0' in text
    assert 'vllm:cache_config_info{block_size="16"} 1.0' in text
    summary = summarize_prometheus(text)
    assert (summary.num_drafts, summary.num_accepted_tokens) == (40, 40)
    assert summary.accepted_per_position == [20]
    assert summary.tau == pytest.approx(2.0)


def test_check_request_body_refuses_what_vllm_would_not_see():
    with pytest.raises(BadRequest, match="not valid JSON"):
        check_request_body(b'{"model": ')
    with pytest.raises(BadRequest, match="JSON object"):
        check_request_body(b"[1, 2]")
    with pytest.raises(BadRequest, match="unknown acceptance method 'sloppy'"):
        check_request_body(b'{"medusa": {"acceptance": "sloppy"}}')
    with pytest.raises(BadRequest, match="unknown .medusa. request option"):
        check_request_body(b'{"medusa": {"tree": "chain-2"}}')
    body = b'{"model": "m", "prompt": "x"}'
    assert check_request_body(body) is body
    # Per-request options go where the engine reads them (SamplingParams.extra_args).
    forwarded = check_request_body(
        b'{"model": "m", "medusa": {"acceptance": "typical", "typical_eps": 0.05}}'
    )
    assert json.loads(forwarded) == {
        "model": "m",
        "vllm_xargs": {"medusa_acceptance": "typical", "medusa_typical_eps": 0.05},
    }


def test_pop_host_port_takes_the_endpoint_flags_out_of_the_server_flags():
    flags = ["--model", "m", "--host", "0.0.0.0", "--port=9000", "--enforce-eager"]
    assert pop_host_port(flags) == (["--model", "m", "--enforce-eager"], "0.0.0.0", 9000)
    assert pop_host_port(["--model", "m"]) == (["--model", "m"], "127.0.0.1", 8000)


def test_serve_config_app_builder_takes_the_serve_command_line():
    """``import_path: vllm_medusa.ray_deployment:app_builder`` builds the same replicas as
    ``vllm-medusa serve ... --ray-replicas N`` (same vLLM flags, heads and tree)."""
    pytest.importorskip("ray.serve")
    from tests.vllm_jobs import SHIPPED_HEADS
    from vllm_medusa.engine_args import medusa_server_args
    from vllm_medusa.ray_deployment import app_builder

    argv = ["/m", "--medusa-heads", str(SHIPPED_HEADS), "--medusa-tree", "chain-2"]
    argv += ["--ray-replicas", "3", "--ray-cpus-per-replica", "2", "--enforce-eager"]
    deployment = app_builder({"argv": [*argv, "--port", "9000"]})._bound_deployment
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 2
    flags = deployment.init_args[0]
    assert flags[:4] == ["--model", "/m", "--dtype", "float32"]
    assert flags[4:8] == medusa_server_args(SHIPPED_HEADS, "chain-2")
    assert flags[8:] == ["--enforce-eager"]  # --port is the endpoint's, not the replicas'
    assert deployment.init_kwargs["cpus_per_replica"] == 2
    with pytest.raises(ValueError, match="argv"):
        app_builder({"model": "/m"})


def test_serve_refuses_bad_replica_counts(capsys):
    from tests.vllm_jobs import SHIPPED_HEADS
    from vllm_medusa.cli import main

    argv = ["serve", "/m", "--medusa-heads", str(SHIPPED_HEADS), "--ray-replicas", "-1"]
    assert main(argv) == 2
    assert "--ray-replicas must be >= 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the cluster


def _engine_job(job: dict, workdir: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``engine_job`` on ``job`` in the background (a plain engine of its own)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, out_file, log = (workdir / f"{name}.{ext}" for ext in ("job.json", "out.json", "log"))
    job_file.write_text(json.dumps(job))
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_medusa.engine_job", str(job_file), str(out_file)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return proc, out_file, log


@dataclass
class Fleet:
    url: str
    reference: dict[str, str]  # prompt -> plain greedy answer
    log_dir: Path


@pytest.fixture(scope="module")
def fleet(smollm2_dir, oracle_heads, tmp_path_factory):
    pytest.importorskip("ray")
    import ray
    from ray import serve

    from vllm_medusa import ray_deployment
    from vllm_medusa.engine_args import medusa_server_args
    from vllm_medusa.ray_serve import free_loopback_port

    work = tmp_path_factory.mktemp("ray-serve")
    # Plain greedy reference, computed in its own process while the replicas start.
    reference_job = _engine_job(
        {
            "model": str(smollm2_dir),
            "engine": {"max_model_len": 2048, "enforce_eager": True},
            "prompts": ORACLE_PROMPTS,
            "sampling": {"temperature": 0, "max_tokens": ORACLE_MAX_TOKENS},
        },
        work,
        "reference",
    )
    server_flags = [
        "--model",
        str(smollm2_dir),
        "--dtype",
        "float32",
        *medusa_server_args(oracle_heads, TREE, draft_budget="full"),
        "--max-model-len",
        "2048",
        "--served-model-name",
        SERVED_NAME,
        "--enforce-eager",
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = ray_deployment.build_app(
            server_flags,
            num_replicas=2,
            cpus_per_replica=1,
            env={"VLLM_CPU_KVCACHE_SPACE": "1"},
            log_dir=str(work / "engines"),
            health_check_period_s=2,
            start_timeout_s=600,
        )
        url = ray_deployment.deploy(app, host="127.0.0.1", port=free_loopback_port())
        proc, out_file, log = reference_job
        if proc.wait(timeout=900) != 0:
            pytest.fail(f"reference engine failed:\n{log.read_text()[-6000:]}")
        texts = json.loads(out_file.read_text())["texts"]
        yield Fleet(url, dict(zip(ORACLE_PROMPTS, texts)), work)
    finally:
        if reference_job[0].poll() is None:
            reference_job[0].kill()
        serve.shutdown()
        ray_deployment.shutdown_registry()
        ray.shutdown()


def _replicas(fleet: Fleet) -> dict[str, dict]:
    import requests

    return requests.get(f"{fleet.url}/medusa/replicas", timeout=30).json()["replicas"]


@dataclass
class Answer:
    text: str
    failures: list[str] = field(default_factory=list)  # retried attempts, why


def _sse_text(resp) -> tuple[str, str | None]:
    """The streamed chat content, and why the stream is incomplete (None: it ended with
    ``data: [DONE]`` and no error event)."""
    parts = []
    for line in resp.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return "".join(parts), None
        chunk = json.loads(data)
        if "error" in chunk:  # vLLM's in-stream error event (e.g. its engine died)
            return "".join(parts), f"stream error event: {chunk['error'].get('message')}"
        if chunk["choices"]:
            parts.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(parts), "stream cut before [DONE]"


def _chat(fleet: Fleet, prompt: str, stream: bool, retry_window_s: float = 120) -> Answer:
    """A greedy chat request, retried the way the deployment documents: on 500/503, on a
    stream cut before ``[DONE]`` and on an in-stream error event (a request on a replica that
    died, or on one whose dead engine Serve has not yet noticed), for at most
    ``retry_window_s``."""
    import requests

    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": ORACLE_MAX_TOKENS,
        "stream": stream,
    }
    failures: list[str] = []
    deadline = time.monotonic() + retry_window_s
    while time.monotonic() < deadline:
        try:
            resp = requests.post(
                f"{fleet.url}/v1/chat/completions",
                json=body,
                stream=stream,
                timeout=REQUEST_TIMEOUT_S,
            )
            if resp.status_code in RETRYABLE:
                failures.append(f"{resp.status_code}: {resp.text[:200]}")
                time.sleep(float(resp.headers.get("Retry-After", 1)))
                continue
            assert resp.status_code == 200, f"{resp.status_code}: {resp.text}"
            if not stream:
                return Answer(resp.json()["choices"][0]["message"]["content"], failures)
            text, incomplete = _sse_text(resp)
            if incomplete is None:
                return Answer(text, failures)
            failures.append(incomplete)
        except requests.exceptions.ChunkedEncodingError as e:
            failures.append(f"stream broken: {e!r}")
        except requests.exceptions.Timeout as e:
            pytest.fail(f"request hung for {REQUEST_TIMEOUT_S} s: {e!r}")
        time.sleep(1)
    pytest.fail(f"no answer within {retry_window_s} s: {failures}")


def _load(fleet: Fleet, requests_: list[tuple[str, bool]], concurrency: int) -> list[Answer]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda r: _chat(fleet, *r), requests_))


@pytest.mark.slow
@pytest.mark.vllm
def test_plugin_patches_apply_in_a_ray_worker(fleet):
    """A Ray task (a fresh worker process Ray started) loads the plugins as vLLM does: every
    method of the ledger carries the plugin's mark afterwards, none before."""
    from vllm_medusa.integration import PATCHED_METHODS
    from vllm_medusa.ray_deployment import patch_ledger_in_ray_worker

    report = patch_ledger_in_ray_worker()
    assert report["pid"] != os.getpid()
    assert not any(report["before"].values()), report["before"]
    assert set(PATCHED_METHODS) <= set(report["after"])
    assert all(report["after"].values()), report["after"]


@pytest.mark.slow
@pytest.mark.vllm
def test_two_replicas_answer_concurrent_chats_like_plain_greedy(fleet):
    replicas = _replicas(fleet)
    assert len(replicas) == 2, replicas
    # One core each, different cores.
    assert sorted(r["cpu_bind"] for r in replicas.values()) == ["0", "1"], replicas
    load = [(p, stream) for stream in (False, True) for p in ORACLE_PROMPTS]  # 8 requests
    answers = _load(fleet, load, concurrency=8)
    for (prompt, stream), answer in zip(load, answers):
        assert answer.failures == [], answer.failures
        assert answer.text == fleet.reference[prompt], f"stream={stream} prompt={prompt!r}"


@pytest.mark.slow
@pytest.mark.vllm
def test_models_and_bad_input_over_http(fleet):
    import requests

    models = requests.get(f"{fleet.url}/v1/models", timeout=30)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == [SERVED_NAME]
    chat = f"{fleet.url}/v1/chat/completions"
    messages = [{"role": "user", "content": ORACLE_PROMPTS[0]}]
    cases = {
        "unknown model": (
            {"json": {"model": "no-such-model", "messages": messages}},
            404,
            "`no-such-model` does not exist",
        ),
        "malformed JSON": ({"data": b'{"model": "smollm2", "messages": ['}, 400, "not valid JSON"),
        "unknown acceptance": (
            {"json": {"model": SERVED_NAME, "messages": messages, "medusa": {"acceptance": "x"}}},
            400,
            "unknown acceptance method 'x'",
        ),
        "invalid parameter": (
            {"json": {"model": SERVED_NAME, "messages": messages, "max_tokens": -3}},
            400,
            "max_tokens",
        ),
    }
    for _ in range(2):  # both replicas see bad input (requests are spread over them)
        for name, (kwargs, status, message) in cases.items():
            resp = requests.post(
                chat, headers={"Content-Type": "application/json"}, timeout=60, **kwargs
            )
            assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text}"
            assert message in resp.json()["error"]["message"], f"{name}: {resp.text}"
    # Still serving, both replicas alive.
    answers = _load(fleet, [(p, False) for p in ORACLE_PROMPTS[:2]], concurrency=2)
    assert [a.text for a in answers] == [fleet.reference[p] for p in ORACLE_PROMPTS[:2]]
    assert len(_replicas(fleet)) == 2


@pytest.mark.slow
@pytest.mark.vllm
def test_metrics_sum_spec_decode_over_replicas(fleet):
    import requests

    deadline = time.monotonic() + 60
    while True:
        # Per-replica counters arrive with the health checks (every 2 s here).
        replicas = _replicas(fleet)
        text = requests.get(f"{fleet.url}/metrics", timeout=30).text
        total = summarize_prometheus(text)
        per_replica = [r["spec_decode"]["num_drafts"] for r in replicas.values()]
        if len(per_replica) == 2 and sum(per_replica) == total.num_drafts:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"/metrics {total.num_drafts} drafts vs replicas {replicas}")
        time.sleep(1)
    assert "vllm_medusa:serve_replicas_reporting 2" in text
    # Both replicas served requests with drafts (the load above went to both).
    assert all(n > 0 for n in per_replica), replicas
    # Oracle heads: whole tree paths are accepted, on the whole fleet.
    assert total.tau > 2.0, total.format()
    print("fleet:", total.format())


@pytest.mark.slow
@pytest.mark.vllm
def test_replica_killed_mid_load_is_replaced_and_no_request_is_lost(fleet):
    replicas = _replicas(fleet)
    assert len(replicas) == 2
    victim_id, victim = sorted(replicas.items())[0]
    load = [(p, i % 2 == 1) for i in range(3) for p in ORACLE_PROMPTS]  # 12 requests
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_chat, fleet, *r) for r in load]
        # Mid-load: once the first answers are back, the others are in flight on both.
        while sum(f.done() for f in futures) < 2:
            time.sleep(0.2)
        os.kill(victim["pid"], signal.SIGKILL)
        answers = [f.result(timeout=4 * REQUEST_TIMEOUT_S) for f in futures]
    for (prompt, stream), answer in zip(load, answers):
        assert answer.text == fleet.reference[prompt], f"stream={stream} {answer.failures}"
    failures = [f for a in answers for f in a.failures]
    print("retried attempts:", failures)
    # Only requests in flight on the victim fail (at most the 4 concurrent ones), each
    # attempt with a documented status.
    assert sum(bool(a.failures) for a in answers) <= 4, failures
    documented = ("500", "503", "stream cut before [DONE]", "stream broken", "stream error event")
    assert all(f.split(":")[0] in documented for f in failures), failures

    # The victim's engine went down with it (no orphan holding its core).
    assert _gone_within(victim["engine_pid"], 30), "engine of the killed replica still runs"

    # Serve replaces the replica: two live replicas again, one of them new.
    _wait_for_replacement(fleet, victim_id)


@pytest.mark.slow
@pytest.mark.vllm
def test_dead_engine_is_noticed_and_its_replica_replaced(fleet):
    """The engine core of one replica crashes mid-load (its API server process stays): the
    health check notices, Serve replaces the replica, and every request completes."""
    import psutil

    replicas = _replicas(fleet)
    assert len(replicas) == 2
    victim_id, victim = sorted(replicas.items())[0]
    load = [(p, i % 2 == 1) for i in range(2) for p in ORACLE_PROMPTS]  # 8 requests
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_chat, fleet, *r) for r in load]
        while sum(f.done() for f in futures) < 2:
            time.sleep(0.2)
        engine_core = psutil.Process(victim["engine_pid"]).children(recursive=True)
        assert engine_core, "no engine-core process under the replica's server"
        for proc in engine_core:
            proc.kill()
        answers = [f.result(timeout=4 * REQUEST_TIMEOUT_S) for f in futures]
    for (prompt, stream), answer in zip(load, answers):
        assert answer.text == fleet.reference[prompt], f"stream={stream} {answer.failures}"
    failures = [f for a in answers for f in a.failures]
    print("retried attempts:", failures)
    documented = ("500", "503", "stream cut before [DONE]", "stream broken", "stream error event")
    assert all(f.split(":")[0] in documented for f in failures), failures
    _wait_for_replacement(fleet, victim_id)
    assert _gone_within(victim["engine_pid"], 60), "server of the replaced replica still runs"


def _wait_for_replacement(fleet: Fleet, victim_id: str) -> None:
    """Until two replicas are live again and ``victim_id`` is not one; then both serve."""
    deadline = time.monotonic() + 600
    while True:
        replicas = _replicas(fleet)
        if len(replicas) == 2 and victim_id not in replicas:
            break
        assert time.monotonic() < deadline, f"replica {victim_id} not replaced: {replicas}"
        time.sleep(2)
    answers = _load(fleet, [(p, False) for p in ORACLE_PROMPTS], concurrency=4)
    assert [a.text for a in answers] == [fleet.reference[p] for p in ORACLE_PROMPTS]


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
