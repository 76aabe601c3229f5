"""The Ray parts of :mod:`vllm_medusa.ray_serve` (needs the ``ray`` extra): the Serve
deployment :class:`MedusaOpenAIReplica`, the :class:`MetricsRegistry` actor, :func:`build_app`,
:func:`deploy`, and the patch-ledger probe run in a Ray worker. Design, health, metrics and the
failure guarantee: see :mod:`vllm_medusa.ray_serve`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from vllm_medusa.metrics import summarize_prometheus
from vllm_medusa.ray_serve import (
    _SKIP_HEADERS,
    APP_NAME,
    DEPLOYMENT_NAME,
    REGISTRY_NAME,
    REGISTRY_NAMESPACE,
    START_TIMEOUT_S,
    BadRequest,
    aggregate_prometheus,
    check_request_body,
    free_loopback_port,
    log_tail,
    openai_error,
    replica_cpu_bind,
)


@ray.remote(num_cpus=0)
class MetricsRegistry:
    """Latest ``/metrics`` text and process facts of every replica, by replica id."""

    def __init__(self):
        self.reports: dict[str, dict] = {}

    def report(self, replica_id: str, info: dict, metrics: str | None) -> None:
        entry = self.reports.setdefault(replica_id, {})
        entry.update(info, reported_at=time.time())
        if metrics is not None:
            entry["metrics"] = metrics

    def forget(self, replica_id: str) -> None:
        self.reports.pop(replica_id, None)

    def live(self, stale_after_s: float) -> dict[str, dict]:
        now = time.time()
        return {
            rid: {**e, "age_s": now - e["reported_at"]}
            for rid, e in self.reports.items()
            if now - e["reported_at"] <= stale_after_s
        }


app = FastAPI()


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class MedusaOpenAIReplica:
    def __init__(
        self,
        server_flags: list[str],
        *,
        cpus_per_replica: int = 1,
        bind_cpus: bool = True,
        acceptance: str = "greedy",
        env: dict[str, str] | None = None,
        log_dir: str | None = None,
        health_check_period_s: float = 5.0,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.acceptance = acceptance
        self.stale_after_s = 3 * health_check_period_s + 10
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        child_env = {**os.environ, **(env or {})}
        # With --distributed-executor-backend ray the server's engine joins this cluster.
        child_env.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        self.cpu_bind = None
        if bind_cpus:
            self.cpu_bind = replica_cpu_bind(
                context.rank.local_rank, cpus_per_replica, sorted(os.sched_getaffinity(0))
            )
            child_env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        log_root = Path(log_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "vllm-medusa-ray")
        log_root.mkdir(parents=True, exist_ok=True)
        self.log = log_root / f"engine-{self.replica_id}.log"
        command = [
            sys.executable,
            "-m",
            "vllm_medusa.serve_child",
            str(os.getpid()),
            "--",
            *server_flags,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        with open(self.log, "w") as log_file:
            self.proc = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,  # its own process group: killed as one
            )
        self.registry = MetricsRegistry.options(
            name=REGISTRY_NAME,
            namespace=REGISTRY_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",  # outlives any one replica
        ).remote()
        self._client: httpx.AsyncClient | None = None
        self._exiting = False
        self._wait_until_healthy(start_timeout_s)
        self._report(None)

    def _wait_until_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server of replica {self.replica_id} exited with rc "
                    f"{self.proc.returncode}:\n{log_tail(self.log)}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self._stop_server()
        raise RuntimeError(
            f"vLLM server of replica {self.replica_id} not healthy after {timeout_s} s:\n"
            + log_tail(self.log)
        )

    @property
    def client(self) -> httpx.AsyncClient:
        # Made on first use, on the event loop that runs the replica's handlers.
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.url, timeout=None)
        return self._client

    def _report(self, metrics: str | None) -> None:
        info = {
            "pid": os.getpid(),
            "engine_pid": self.proc.pid,
            "cpu_bind": self.cpu_bind,
            "node_ip": ray.util.get_node_ip_address(),
            "log": str(self.log),
        }
        self.registry.report.remote(self.replica_id, info, metrics)

    def _exit_if_server_gone(self) -> None:
        """Once the server process has exited (vLLM's API server exits when its engine core
        dies), end this replica too, shortly (after the current answer): Serve marks a dead
        replica at once and starts a replacement, where a failing health check needs 3
        periods in a row, during which the router keeps sending requests here (a replica
        that fails fast looks idle)."""
        if self.proc.poll() is not None and not self._exiting:
            self._exiting = True
            print(
                f"vLLM server of replica {self.replica_id} exited (rc {self.proc.returncode}); "
                f"ending the replica:\n{log_tail(self.log)}",
                file=sys.stderr,
                flush=True,
            )
            asyncio.get_running_loop().call_later(0.5, os._exit, 1)

    async def check_health(self) -> None:
        """Serve's health check: the server process runs and vLLM's ``/health`` (which
        checks the engine core) says 200. Also reports this replica's metrics."""
        self._exit_if_server_gone()
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"vLLM server exited with rc {self.proc.returncode}:\n{log_tail(self.log)}"
            )
        health = await self.client.get("/health", timeout=10)
        if health.status_code != 200:
            raise RuntimeError(f"vLLM /health answered {health.status_code}: {health.text}")
        metrics = await self.client.get("/metrics", timeout=10)
        self._report(metrics.text if metrics.status_code == 200 else None)

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        """vLLM's metrics summed over every live replica (this one read fresh)."""
        own = await self.client.get("/metrics", timeout=10)
        self._report(own.text)
        live = await self.registry.live.remote(self.stale_after_s)
        texts = [e["metrics"] for e in live.values() if e.get("metrics")]
        header = (
            "# HELP vllm_medusa:serve_replicas_reporting Replicas whose metrics are summed.\n"
            "# TYPE vllm_medusa:serve_replicas_reporting gauge\n"
            f"vllm_medusa:serve_replicas_reporting {len(texts)}\n"
        )
        return PlainTextResponse(header + aggregate_prometheus(texts))

    @app.get("/medusa/replicas")
    async def replicas(self) -> JSONResponse:
        self._report(None)
        live = await self.registry.live.remote(self.stale_after_s)
        listing = {}
        for rid, entry in live.items():
            listing[rid] = {k: v for k, v in entry.items() if k != "metrics"}
            if entry.get("metrics"):
                spec = summarize_prometheus(entry["metrics"])
                listing[rid]["spec_decode"] = {"num_drafts": spec.num_drafts, "tau": spec.tau}
        return JSONResponse({"replicas": listing, "answered_by": self.replica_id})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def proxy(self, path: str, request: Request) -> Response:
        body = await request.body()
        if request.method == "POST" and path.startswith("v1/"):
            try:
                body = check_request_body(body)
            except BadRequest as e:
                return JSONResponse(openai_error(400, str(e)), status_code=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS}
        upstream_request = self.client.build_request(
            request.method,
            "/" + path,
            params=request.query_params,
            content=body,
            headers=headers,
        )
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.TransportError as e:
            self._exit_if_server_gone()
            message = f"engine of replica {self.replica_id} unavailable ({e!r}); retry"
            return JSONResponse(
                openai_error(503, message, "ServiceUnavailableError"),
                status_code=503,
                headers={"Retry-After": "1"},
            )
        reply_headers = {
            k: v for k, v in upstream.headers.items() if k.lower() not in _SKIP_HEADERS
        }
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):

            async def relay():
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                except httpx.TransportError:
                    return  # engine gone mid-stream: the stream ends without [DONE]
                finally:
                    await upstream.aclose()

            return StreamingResponse(
                relay(), status_code=upstream.status_code, headers=reply_headers
            )
        try:
            content = await upstream.aread()
        except httpx.TransportError as e:
            message = f"engine of replica {self.replica_id} failed mid-response ({e!r}); retry"
            return JSONResponse(
                openai_error(503, message, "ServiceUnavailableError"),
                status_code=503,
                headers={"Retry-After": "1"},
            )
        finally:
            await upstream.aclose()
        return Response(content, status_code=upstream.status_code, headers=reply_headers)

    def _stop_server(self) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait_s)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def __del__(self):
        # Serve's graceful shutdown of this replica (scale-down, redeploy, serve.shutdown).
        registry = getattr(self, "registry", None)
        if registry is not None:
            try:
                registry.forget.remote(self.replica_id)
            except Exception:
                pass
        if getattr(self, "proc", None) is not None:
            self._stop_server()


def build_app(
    server_flags: list[str],
    *,
    num_replicas: int,
    cpus_per_replica: int = 1,
    bind_cpus: bool = True,
    acceptance: str = "greedy",
    env: dict[str, str] | None = None,
    log_dir: str | None = None,
    health_check_period_s: float = 5.0,
    max_ongoing_requests: int = 64,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Any:
    """The Serve application: ``num_replicas`` replicas of vLLM's OpenAI server started with
    ``server_flags`` (``vllm.entrypoints.openai.api_server``'s flags, e.g.
    ``serve.build_command(args)[3:]``, without ``--host``/``--port``).
    Each replica reserves ``cpus_per_replica`` Ray CPUs and, with ``bind_cpus``, binds its
    engine's threads to as many cores of its own."""
    return MedusaOpenAIReplica.options(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=max(30.0, 2 * health_check_period_s),
        max_ongoing_requests=max_ongoing_requests,
        graceful_shutdown_timeout_s=30,
    ).bind(
        server_flags,
        cpus_per_replica=cpus_per_replica,
        bind_cpus=bind_cpus,
        acceptance=acceptance,
        env=env,
        log_dir=log_dir,
        health_check_period_s=health_check_period_s,
        start_timeout_s=start_timeout_s,
    )


def app_builder(args: dict) -> Any:
    """Serve config entry point (``import_path: vllm_medusa.ray_deployment:app_builder``):
    ``args["argv"]`` is a ``vllm-medusa serve`` command line (without ``vllm-medusa serve``),
    e.g. ``[MODEL, "--medusa-heads", DIR, "--ray-replicas", "2", "--enforce-eager"]``; the
    endpoint's host and port come from the config's ``http_options``."""
    from vllm_medusa import cli, serve

    argv = args.get("argv") if isinstance(args, dict) else None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError('app_builder needs args {"argv": [MODEL, "--medusa-heads", DIR, ...]}')
    parsed, extra = cli.build_parser().parse_known_args(["serve", *argv])
    parsed.extra_args = extra
    app, _, _ = serve.ray_app(parsed)
    return app


def deploy(app: Any, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and run ``app`` there (Ray must be up);
    returns the endpoint's URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"


def shutdown_registry() -> None:
    """Kill the (detached) metrics registry actor, if any."""
    import ray

    try:
        ray.kill(ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE))
    except ValueError:
        pass


# ----------------------------------------------------------------------------- plugin in Ray


def patch_ledger_in_ray_worker() -> dict:
    """Run in a fresh Ray worker: load vLLM's general plugins as every vLLM process does and
    report which patch targets carry the plugin's mark, before and after."""
    import ray

    @ray.remote(num_cpus=0)
    def ledger_task() -> dict:
        from vllm_medusa.integration import patch_ledger

        before = patch_ledger()
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        return {"pid": os.getpid(), "before": before, "after": patch_ledger()}

    return ray.get(ledger_task.remote())
