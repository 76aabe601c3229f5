"""The ``vllm-medusa`` command.

Each subcommand lives in its own module exposing ``configure_parser(parser)`` and
``run(args) -> int``; modules are imported lazily so ``--help`` stays fast and a subcommand
never pays for another's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-model": ("vllm_medusa.models", "prepare a base model (e.g. smollm2) as a HF folder"),
    "generate": ("vllm_medusa.generate", "generate answers to MT-Bench prompts with vLLM"),
    "distill": ("vllm_medusa.training.distill", "self-distillation data: the base model's answers"),
    "teacher-force": (
        "vllm_medusa.training.teacher",
        "training data at scale: hidden states + greedy labels over ShareGPT answers",
    ),
    "train": ("vllm_medusa.training.train", "train Medusa heads on a frozen base model (CPU)"),
    "train-sequential": (
        "vllm_medusa.training.sequential",
        "train sequential (Hydra-style) heads over a draft vocabulary (CPU)",
    ),
    "learning-curve": (
        "vllm_medusa.training.curve",
        "head quality vs training data (held-out top-1 and simulated tau)",
    ),
    "eval-heads": ("vllm_medusa.training.evaluate", "per-head accuracy and simulated tree tau"),
    "calibrate-tree": ("vllm_medusa.training.calibrate", "grow a tree from measured accuracies"),
    "serve": ("vllm_medusa.serve", "OpenAI-compatible vLLM server with tree Medusa"),
    "bench": (
        "vllm_medusa.bench",
        "plain vs n-gram vs chain vs tree Medusa at several concurrencies (server or offline)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-medusa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure_parser(p)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input (heads, trees, options, data): one line, no traceback."""
    from vllm_medusa.core.checkpoint import CheckpointError
    from vllm_medusa.core.tree import TreeError
    from vllm_medusa.integration.options import MedusaConfigError
    from vllm_medusa.training.common import TrainingError
    from vllm_medusa.training.conversations import ConversationFileError

    return CheckpointError, TreeError, MedusaConfigError, TrainingError, ConversationFileError


# Commands that serve: they run with tcmalloc and Intel OpenMP preloaded (vllm_medusa.preload).
PRELOADED_COMMANDS = ("generate", "serve")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if argv is None and args.command in PRELOADED_COMMANDS:
        from vllm_medusa.preload import reexec_with_preload

        reexec_with_preload(sys.argv[1:])  # returns when nothing is to be preloaded
    args.extra_args = extra
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except _user_errors() as e:  # evaluated only when an exception propagates
        message = " ".join(str(e).split())
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
