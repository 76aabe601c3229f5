"""Helpers shared by the training subcommands (no vLLM, no transformers at import time)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class TrainingError(RuntimeError):
    """A user-facing error of the training commands (bad input, mismatched files)."""


def resolve_model(model: str | Path | None) -> Path:
    """A base model folder: ``model`` when given, else the prepared SmolLM2 (prepared on
    first use)."""
    if model is None:
        from vllm_medusa.models import prepare_smollm2

        return Path(prepare_smollm2())
    path = Path(model)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise TrainingError(
            f"base model {path} is not a Hugging Face model folder (no config.json); "
            "prepare one with `vllm-medusa prepare-model`"
        )
    return path


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    elif os.cpu_count():
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def load_base_model(model_path: Path):
    """The frozen base model in fp32, eval mode, and its tokenizer (transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def base_lm_head_weight(model) -> torch.Tensor:
    """The base model's LM head ``[V, H]`` (the tied embedding for SmolLM2)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise TrainingError("the base model needs a bias-free linear LM head")
    return head.weight.detach()


def model_dims(model_path: Path) -> tuple[int, int]:
    """``(hidden_size, vocab_size)`` from a HF ``config.json``."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    if "text_config" in cfg:
        cfg = cfg["text_config"]
    try:
        return int(cfg["hidden_size"]), int(cfg["vocab_size"])
    except KeyError as e:
        raise TrainingError(f"{model_path}/config.json has no {e.args[0]}") from e


def write_json(path: str | Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def run_guarded(command: str, body, args) -> int:
    """Run a subcommand's body; user-facing errors become one line on stderr and exit 2."""
    import sys

    try:
        return body(args)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"vllm-medusa {command}: error: {e}", file=sys.stderr)
        return 2
