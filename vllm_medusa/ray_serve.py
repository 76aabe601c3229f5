"""Ray Serve deployment of the tree-Medusa OpenAI server: N replicas behind one HTTP endpoint.

``vllm-medusa serve MODEL --medusa-heads DIR --ray-replicas N [vLLM server flags]`` (or
:func:`vllm_medusa.ray_deployment.build_app` from Python or a Serve config, see the README)
deploys N replicas of
:class:`MedusaOpenAIReplica`. Each replica supervises one vLLM OpenAI server on a free loopback
port, started with exactly the command ``vllm-medusa serve`` runs (same heads, tree, options,
vLLM flags), and proxies HTTP to it, streaming included.

Why a supervised server per replica rather than vLLM's app in the replica process:

- the replica serves *the same code path* as ``vllm-medusa serve`` (vLLM's own routes, error
  handling, chat templates, SSE framing), with no copy of vLLM's app-building internals that
  change between releases;
- the engine lives in its own process group: an engine crash never poisons the Ray worker,
  the replica notices it (health check) and Serve replaces the replica; the project's rule
  "one engine per process" holds trivially;
- per-replica CPU binding is an environment variable of the child
  (``VLLM_CPU_OMP_THREADS_BIND``), set before vLLM reads it.
The cost is one extra loopback hop per request (well under a millisecond, next to a decode).

Health: Serve calls :meth:`MedusaOpenAIReplica.check_health` every ``health_check_period_s``;
it fails when the server process exited or vLLM's ``/health`` (which asks the engine core)
does not answer 200, and Serve then replaces the replica. A replica whose server process has
exited (vLLM's server exits when its engine core dies) ends itself as soon as it notices (a
health check or a request), so Serve replaces it at once instead of after 3 failed checks. A replica killed outright takes its
server down with it (:mod:`vllm_medusa.serve_child` watches its parent).

Metrics: each health check also reads the replica's vLLM ``/metrics`` and reports it to one
named Ray actor (:class:`MetricsRegistry`); the deployment's own ``/metrics`` sums the
samples of every live replica (:func:`aggregate_prometheus`), so vLLM's spec-decode counters
(and :func:`vllm_medusa.metrics.summarize_prometheus`'s tau) cover the whole fleet.
``/medusa/replicas`` lists the live replicas (ids, pids, CPU binding, metrics age).

Failure guarantee (what a client sees when a replica dies; every request is stateless and
greedy requests are deterministic, so a retry gives the same answer):

- requests that arrive after Serve marked the replica dead go to live replicas;
- a request in flight on a replica whose *engine* died gets ``503`` with ``Retry-After: 1``
  from the replica if its response had not started;
- a request in flight on a replica whose *process* died gets ``500`` from Serve's proxy (Ray
  reports the actor's death) if its response had not started;
- a request that reached vLLM when its engine died gets vLLM's own ``500`` (engine dead);
- a streamed response already under way (status 200 sent) ends without ``data: [DONE]``, or
  with vLLM's in-stream error event (``data: {"error": ...}``) before it;
- until the replica has noticed its dead engine (at most one health-check period, usually
  the first request) and ended, requests routed to it get ``503``/``500`` at once;
- with no live replica at all, Serve answers ``503``.
Clients retry on 500/503, on a stream without ``[DONE]`` and on an error event; nothing else
fails. Bad input is
``4xx`` from vLLM (unknown model ``404``, invalid parameters ``400``) or from the replica
(body that is not JSON, an unknown ``medusa`` request option: ``400``).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

DEPLOYMENT_NAME = "MedusaOpenAI"
APP_NAME = "vllm-medusa"
REGISTRY_NAME = "vllm_medusa_metrics_registry"
REGISTRY_NAMESPACE = "vllm_medusa"
START_TIMEOUT_S = 900.0
# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes.
_SKIP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "host",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
}


# ----------------------------------------------------------------------------- pure helpers


def replica_cpu_bind(local_rank: int, cpus_per_replica: int, available: list[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for the replica of this node-local rank: its own
    ``cpus_per_replica`` cores of ``available`` (wrapping around when replicas outnumber
    cores, e.g. a replacement replica starting beside the one it replaces)."""
    if cpus_per_replica < 1 or not available:
        raise ValueError("need at least one CPU per replica and one available CPU")
    cores = sorted(available)
    start = (local_rank * cpus_per_replica) % len(cores)
    chosen = [cores[(start + i) % len(cores)] for i in range(min(cpus_per_replica, len(cores)))]
    return ",".join(str(c) for c in sorted(set(chosen)))


def _sample_key_and_value(line: str) -> tuple[str, str, float] | None:
    """``(name, labels, value)`` of a Prometheus sample line (no timestamp), else None."""
    if not line or line.startswith("#"):
        return None
    brace = line.find("{")
    if brace >= 0:
        end = line.rfind("}")
        name, labels, rest = line[:brace], line[brace : end + 1], line[end + 1 :]
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    try:
        return name, labels, float(rest.split()[0])
    except (IndexError, ValueError):
        return None


def aggregate_prometheus(texts: list[str]) -> str:
    """Several servers' ``/metrics`` texts as one: samples with the same name and labels are
    summed (counters, gauges, histogram buckets/sums/counts); ``*_created`` timestamps keep
    the earliest and ``*_info`` gauges the largest value. ``# HELP``/``# TYPE`` lines once."""
    order: list[str] = []  # metadata lines and sample keys, in first-seen order
    seen_meta: set[str] = set()
    values: dict[str, float] = {}
    for text in texts:
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("#"):
                if line not in seen_meta:
                    seen_meta.add(line)
                    order.append(line)
                continue
            parsed = _sample_key_and_value(line)
            if parsed is None:
                continue
            name, labels, value = parsed
            key = name + labels
            if key not in values:
                order.append(key)
                values[key] = value
            elif name.endswith("_created"):
                values[key] = min(values[key], value)
            elif name.endswith("_info"):
                values[key] = max(values[key], value)
            else:
                values[key] += value
    out = [line if line.startswith("#") else f"{line} {values[line]!r}" for line in order]
    return "\n".join(out) + "\n"


class BadRequest(ValueError):
    """A request the replica refuses before vLLM sees it (answered 400)."""


# The request's "medusa" object -> the SamplingParams.extra_args keys tree Medusa reads
# (``integration/tree_sampling.py``; the OpenAI server passes ``vllm_xargs`` through).
REQUEST_OPTIONS = {
    "acceptance": "medusa_acceptance",
    "typical_eps": "medusa_typical_eps",
    "typical_delta": "medusa_typical_delta",
}


def check_request_body(body: bytes) -> bytes:
    """The body to forward to vLLM. Refuses a body that is not a JSON object; an optional
    per-request ``"medusa": {"acceptance": ..., "typical_eps": ..., "typical_delta": ...}``
    (vLLM would silently ignore an unknown field) is checked and moved into ``vllm_xargs``,
    where the engine reads it (and answers 400 for values it refuses)."""
    from vllm_medusa.integration.options import ACCEPTANCE_METHODS

    try:
        request = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(request).__name__}")
    if "medusa" not in request:
        return body
    options = request.pop("medusa")
    if not isinstance(options, dict):
        raise BadRequest('"medusa" must be an object such as {"acceptance": "typical"}')
    unknown = sorted(set(options) - set(REQUEST_OPTIONS))
    if unknown:
        raise BadRequest(
            f'unknown "medusa" request option(s) {unknown}; known: {list(REQUEST_OPTIONS)}'
        )
    acceptance = options.get("acceptance", "greedy")
    if acceptance not in ACCEPTANCE_METHODS:
        raise BadRequest(
            f"unknown acceptance method {acceptance!r}; supported: {list(ACCEPTANCE_METHODS)}"
        )
    xargs = request.setdefault("vllm_xargs", {})
    if not isinstance(xargs, dict):
        raise BadRequest('"vllm_xargs" must be an object')
    xargs.update({REQUEST_OPTIONS[k]: v for k, v in options.items()})
    return json.dumps(request).encode()


def openai_error(status: int, message: str, kind: str = "BadRequestError") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"
