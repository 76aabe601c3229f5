"""Reading and writing Medusa head checkpoints (no vLLM import).

Formats, each a folder:

- ``vllm-medusa`` (canonical, this project's): ``config.json`` (MedusaConfig + ``format``,
  ``format_version``), ``heads.safetensors`` (``heads.{h}.blocks.{l}.weight|bias``,
  ``heads.{h}.lm_head.weight``), optional ``tree.json`` (``{"paths": [...]}``).
- ``fasterdecoding-v0.1`` (reference Medusa repository): ``medusa_lm_head.pt`` or
  ``.safetensors`` with ``{i}.{l}.linear.weight|bias`` and ``{i}.{L}.weight`` (LM head, no bias);
  ``config.json`` with ``medusa_num_heads``/``medusa_num_layers`` (often under-reported).
- ``fasterdecoding-shared``: the same without the ``{i}.{L}.weight`` tensors (heads use the
  base model's LM head).
- ``vllm``: what vLLM's ``model_executor/models/medusa.py`` loads: ``config.json`` with
  ``model_type: "medusa"``, ``model.safetensors`` with ``blocks.{h}.layers.{l}.weight|bias``,
  ``lm_heads.{h}.weight`` and optional ``token_map``.
- ``vllm-medusa-sequential``: sequential (Hydra-style) heads over a draft vocabulary, read by
  :mod:`vllm_medusa.core.sequential_heads` (``load_heads`` dispatches to it).

Every problem found while reading raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_medusa.core.heads import MedusaConfig, MedusaHeads
from vllm_medusa.core.sequential_heads import (
    SEQUENTIAL_FORMAT,
    SequentialCheckpointError,
    SequentialHeads,
    is_sequential_config,
    load_sequential_heads,
)

FORMAT_NAME = "vllm-medusa"
FORMAT_VERSION = 1

CANONICAL = "vllm-medusa"
FASTERDECODING_V01 = "fasterdecoding-v0.1"
FASTERDECODING_SHARED = "fasterdecoding-shared"
VLLM = "vllm"
SEQUENTIAL = SEQUENTIAL_FORMAT  # sequential (Hydra-style) heads: core/sequential_heads.py

CONFIG_FILE = "config.json"
CANONICAL_WEIGHTS = "heads.safetensors"
TREE_FILE = "tree.json"
FASTERDECODING_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
VLLM_WEIGHTS = "model.safetensors"
# Metadata block this project adds to exported vLLM configs (nested: vLLM's MedusaConfig
# renames every top-level key containing "num" and "heads"/"layers").
VLLM_EXPORT_META_KEY = "vllm_medusa"


class CheckpointError(ValueError):
    """A Medusa checkpoint cannot be read as asked (message names the file and the mismatch)."""


@dataclass
class CheckpointInfo:
    """Where a set of heads came from; attached to loaded heads as ``heads.checkpoint_info``."""

    format: str
    path: Path
    weights_file: Path
    raw_config: dict = field(default_factory=dict)
    tree: list[list[int]] | None = None


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or torch ``.pt`` file, on the CPU."""
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint must never run code while being read.
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise CheckpointError(
            f"cannot read weight file {path} (truncated or corrupt?): {exc}"
        ) from exc
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{path} is not a flat dictionary of named tensors")
    return tensors


def _check_expected(
    weights_file: Path,
    hidden_size: int,
    vocab_size: int,
    expected_hidden_size: int | None,
    expected_vocab_size: int | None,
) -> None:
    if expected_hidden_size is not None and hidden_size != expected_hidden_size:
        raise CheckpointError(
            f"heads in {weights_file} have hidden size {hidden_size} "
            f"but the base model has {expected_hidden_size}"
        )
    if expected_vocab_size is not None and vocab_size != expected_vocab_size:
        raise CheckpointError(
            f"heads in {weights_file} have vocabulary size {vocab_size} "
            f"but the base model has {expected_vocab_size}"
        )


def read_tree_file(path: str | Path) -> list[list[int]] | None:
    """The tree paths stored in a folder's ``tree.json`` (or that file itself); None if absent."""
    path = Path(path)
    tree_file = path / TREE_FILE if path.is_dir() else path
    if not tree_file.exists():
        return None
    try:
        data = json.loads(tree_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {tree_file}: {exc}") from exc
    # A bare list of paths, as the `tree` option takes, or {"paths": [...], ...}.
    paths = data.get("paths") if isinstance(data, dict) else data
    if not isinstance(paths, list) or not all(
        isinstance(p, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in p)
        for p in paths
    ):
        raise CheckpointError(
            f'{tree_file}: expected a list of rank paths (lists of integers) or {{"paths": [...]}}'
        )
    return [list(p) for p in paths]


def _write_tree_file(folder: Path, tree: list[list[int]]) -> None:
    paths = [[int(r) for r in p] for p in tree]
    (folder / TREE_FILE).write_text(json.dumps({"paths": paths}) + "\n")


# --------------------------------------------------------------------------------------
# Assembling heads from per-head tensors (shared by every reader)
# --------------------------------------------------------------------------------------


@dataclass
class _HeadTensors:
    """Tensors found in a file, indexed by head (and layer); ``key`` names them in errors."""

    weights: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    biases: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    lm_heads: dict[int, torch.Tensor] = field(default_factory=dict)

    def num_heads(self) -> int:
        indices = [h for h, _ in self.weights] + [h for h, _ in self.biases] + list(self.lm_heads)
        return max(indices) + 1 if indices else 0

    def num_layers(self) -> int:
        layers = [layer for _, layer in self.weights] + [layer for _, layer in self.biases]
        return max(layers) + 1 if layers else 0


def _assemble(
    weights_file: Path,
    found: _HeadTensors,
    key: Callable[[str, int, int], str],
    *,
    shared_lm_head: bool,
    missing_biases: str,
    vocab_size: int | None = None,
    hidden_size: int | None = None,
    base_model_name_or_path: str | None = None,
    extra: dict | None = None,
    dtype: torch.dtype,
    expected_hidden_size: int | None,
    expected_vocab_size: int | None,
) -> MedusaHeads:
    """Check completeness and shapes, then stack into :class:`MedusaHeads`.

    ``key(kind, head, layer)`` gives a tensor's name in the file (``kind`` in weight, bias,
    lm_head). ``missing_biases``: "error", or "zero" (a checkpoint whose format has no biases).
    """
    num_heads, num_layers = found.num_heads(), found.num_layers()
    if num_heads == 0:
        raise CheckpointError(f"{weights_file} holds no Medusa head tensors")
    for h in range(num_heads):
        for layer in range(num_layers):
            if (h, layer) not in found.weights:
                raise CheckpointError(
                    f"{weights_file}: head {h} has no layer {layer} weight "
                    f"(missing key '{key('weight', h, layer)}')"
                )
    if found.biases or missing_biases == "error":
        for h in range(num_heads):
            for layer in range(num_layers):
                if (h, layer) not in found.biases:
                    raise CheckpointError(
                        f"{weights_file}: head {h} has no layer {layer} bias "
                        f"(missing key '{key('bias', h, layer)}')"
                    )
    if not shared_lm_head:
        for h in range(num_heads):
            if h not in found.lm_heads:
                raise CheckpointError(
                    f"{weights_file}: head {h} has no LM head (missing key '{key('lm_head', h, 0)}')"
                )

    # Hidden size: the first block weight decides, every other tensor must agree.
    if found.weights:
        first = found.weights[(0, 0)]
        hidden_size = int(first.shape[-1])
    elif found.lm_heads:
        hidden_size = int(found.lm_heads[0].shape[-1])
    if hidden_size is None:
        hidden_size = expected_hidden_size
    if hidden_size is None:
        raise CheckpointError(f"{weights_file} has no block or LM head tensors to size the heads")
    for (h, layer), w in found.weights.items():
        if tuple(w.shape) != (hidden_size, hidden_size):
            raise CheckpointError(
                f"{weights_file}: '{key('weight', h, layer)}' has shape {tuple(w.shape)}, "
                f"expected ({hidden_size}, {hidden_size}) like '{key('weight', 0, 0)}'"
            )
    for (h, layer), b in found.biases.items():
        if tuple(b.shape) != (hidden_size,):
            raise CheckpointError(
                f"{weights_file}: '{key('bias', h, layer)}' has shape {tuple(b.shape)}, "
                f"expected ({hidden_size},)"
            )
    if not shared_lm_head:
        vocab_size = int(found.lm_heads[0].shape[0])
        for h, w in found.lm_heads.items():
            if tuple(w.shape) != (vocab_size, hidden_size):
                raise CheckpointError(
                    f"{weights_file}: '{key('lm_head', h, 0)}' has shape {tuple(w.shape)}, "
                    f"expected ({vocab_size}, {hidden_size}) like '{key('lm_head', 0, 0)}'"
                )
    if vocab_size is None:
        raise CheckpointError(f"{weights_file}: vocabulary size unknown")
    _check_expected(
        weights_file, hidden_size, vocab_size, expected_hidden_size, expected_vocab_size
    )

    try:
        config = MedusaConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            num_heads=num_heads,
            num_layers=num_layers,
            shared_lm_head=shared_lm_head,
            base_model_name_or_path=base_model_name_or_path,
            extra=dict(extra or {}),
        )
    except ValueError as exc:
        raise CheckpointError(f"{weights_file}: {exc}") from exc
    heads = MedusaHeads(config, dtype=dtype)
    with torch.no_grad():
        for (h, layer), w in found.weights.items():
            heads.block_weight[h, layer].copy_(w)
        for (h, layer), b in found.biases.items():
            heads.block_bias[h, layer].copy_(b)
        if heads.lm_head_weight is not None:
            for h, w in found.lm_heads.items():
                heads.lm_head_weight[h].copy_(w)
    return heads


# --------------------------------------------------------------------------------------
# Canonical format
# --------------------------------------------------------------------------------------


def _canonical_key(kind: str, head: int, layer: int) -> str:
    if kind == "lm_head":
        return f"heads.{head}.lm_head.weight"
    return f"heads.{head}.blocks.{layer}.{kind}"


def save_heads(heads: MedusaHeads, path: str | Path, tree: list[list[int]] | None = None) -> Path:
    """Write ``heads`` (and optionally a tree) as a canonical folder; returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = heads.config
    tensors: dict[str, torch.Tensor] = {}
    for h in range(config.num_heads):
        for layer in range(config.num_layers):
            tensors[_canonical_key("weight", h, layer)] = heads.block_weight[h, layer]
            tensors[_canonical_key("bias", h, layer)] = heads.block_bias[h, layer]
        if heads.lm_head_weight is not None:
            tensors[_canonical_key("lm_head", h, 0)] = heads.lm_head_weight[h]
    # Slices of stacked parameters share storage: safetensors wants separate tensors.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(folder / CANONICAL_WEIGHTS), metadata={"format": FORMAT_NAME})
    meta = config.to_dict() | {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tree is not None:
        _write_tree_file(folder, tree)
    return folder


_CANONICAL_PATTERN = re.compile(r"heads\.(\d+)\.(?:blocks\.(\d+)\.(weight|bias)|lm_head\.weight)")


def _load_canonical(folder: Path, raw: dict, **kwargs) -> tuple[MedusaHeads, Path]:
    config_file = folder / CONFIG_FILE
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_file} has format_version {version!r}; this reader knows {FORMAT_VERSION}"
        )
    try:
        config = MedusaConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: {exc}") from exc
    weights_file = folder / CANONICAL_WEIGHTS
    if not weights_file.exists():
        raise CheckpointError(f"{folder}: weight file missing, looked for {weights_file}")
    found = _HeadTensors()
    for name, tensor in _read_tensors(weights_file).items():
        match = _CANONICAL_PATTERN.fullmatch(name)
        if match is None:
            raise CheckpointError(f"{weights_file}: unexpected tensor '{name}'")
        head, layer, kind = match.groups()
        if layer is None:
            found.lm_heads[int(head)] = tensor
        elif kind == "weight":
            found.weights[(int(head), int(layer))] = tensor
        else:
            found.biases[(int(head), int(layer))] = tensor
    if config.shared_lm_head and found.lm_heads:
        raise CheckpointError(
            f"{weights_file} has LM head tensors but {config_file} says shared_lm_head"
        )
    heads = _assemble(
        weights_file,
        found,
        _canonical_key,
        shared_lm_head=config.shared_lm_head,
        missing_biases="error",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        base_model_name_or_path=config.base_model_name_or_path,
        extra=config.extra,
        **kwargs,
    )
    got, want = heads.config, config
    for name in ("hidden_size", "vocab_size", "num_heads", "num_layers"):
        if getattr(got, name) != getattr(want, name):
            raise CheckpointError(
                f"{weights_file} has {name} {getattr(got, name)} "
                f"but {config_file} says {getattr(want, name)}"
            )
    return heads, weights_file


# --------------------------------------------------------------------------------------
# FasterDecoding v0.1 and its shared-LM-head variant
# --------------------------------------------------------------------------------------


def _fasterdecoding_key(kind: str, head: int, layer: int) -> str:
    if kind == "lm_head":
        return f"{head}.<num_layers>.weight"
    return f"{head}.{layer}.linear.{kind}"


_FD_BLOCK = re.compile(r"(\d+)\.(\d+)\.linear\.(weight|bias)")
_FD_LM_HEAD = re.compile(r"(\d+)\.(\d+)\.weight")


def _strip_container_prefix(name: str) -> str:
    # Whole-model state dicts name the head list "medusa_head" (reference) or "medusa_heads".
    for prefix in ("medusa_heads.", "medusa_head."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _load_fasterdecoding(
    folder: Path, raw: dict, weights_file: Path, *, expected_vocab_size: int | None, **kwargs
) -> tuple[MedusaHeads, Path, str]:
    found = _HeadTensors()
    lm_head_index: dict[int, tuple[int, str]] = {}  # head -> (index in its Sequential, key)
    for name, tensor in _read_tensors(weights_file).items():
        short = _strip_container_prefix(name)
        if match := _FD_BLOCK.fullmatch(short):
            head, layer, kind = int(match[1]), int(match[2]), match[3]
            (found.weights if kind == "weight" else found.biases)[(head, layer)] = tensor
        elif match := _FD_LM_HEAD.fullmatch(short):
            found.lm_heads[int(match[1])] = tensor
            lm_head_index[int(match[1])] = (int(match[2]), name)
        else:
            raise CheckpointError(
                f"{weights_file}: unexpected tensor '{name}' (a FasterDecoding Medusa file has "
                "only '{i}.{l}.linear.weight', '{i}.{l}.linear.bias' and '{i}.{L}.weight')"
            )
    num_heads, num_layers = found.num_heads(), found.num_layers()
    # The LM head follows the L ResBlocks in each head's nn.Sequential: index L.
    for head, (index, name) in sorted(lm_head_index.items()):
        if index != num_layers:
            raise CheckpointError(
                f"{weights_file}: '{name}' looks like head {head}'s LM head at index {index}, "
                f"but the heads have {num_layers} layer(s), so it should be index {num_layers}"
            )
    shared = not found.lm_heads
    if not shared and len(found.lm_heads) != num_heads:
        without = sorted(set(range(num_heads)) - set(found.lm_heads))
        raise CheckpointError(
            f"{weights_file}: heads {sorted(found.lm_heads)} have an LM head "
            f"('{{i}}.{num_layers}.weight') but heads {without} do not"
        )

    # Published configs under-report the head count: the weights decide.
    for config_key, inferred, what in (
        ("medusa_num_heads", num_heads, "heads"),
        ("medusa_num_layers", num_layers, "layers per head"),
    ):
        if config_key in raw and raw[config_key] != inferred:
            warnings.warn(
                f"{folder / CONFIG_FILE} says {config_key}={raw[config_key]} but "
                f"{weights_file} holds {inferred} {what}; using {inferred} from the weights",
                stacklevel=3,
            )
    if not found.biases and num_layers > 0:
        warnings.warn(
            f"{weights_file} has no ResBlock biases ('{{i}}.{{l}}.linear.bias'); "
            "loading them as zeros",
            stacklevel=3,
        )

    vocab_size = None
    if shared:
        config_vocab = raw.get("vocab_size")
        if config_vocab is not None and expected_vocab_size is not None:
            if config_vocab != expected_vocab_size:
                raise CheckpointError(
                    f"{folder / CONFIG_FILE} says vocab_size {config_vocab} "
                    f"but the base model has {expected_vocab_size}"
                )
        vocab_size = config_vocab if config_vocab is not None else expected_vocab_size
        if vocab_size is None:
            raise CheckpointError(
                f"{weights_file} holds heads that share the base model's LM head, so the "
                f"vocabulary size is not in the weights: add 'vocab_size' to "
                f"{folder / CONFIG_FILE} or pass expected_vocab_size"
            )
    heads = _assemble(
        weights_file,
        found,
        _fasterdecoding_key,
        shared_lm_head=shared,
        missing_biases="zero",
        vocab_size=vocab_size,
        hidden_size=raw.get("hidden_size"),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        expected_vocab_size=expected_vocab_size,
        **kwargs,
    )
    return heads, weights_file, FASTERDECODING_SHARED if shared else FASTERDECODING_V01


# --------------------------------------------------------------------------------------
# vLLM layout
# --------------------------------------------------------------------------------------


def _vllm_key(kind: str, head: int, layer: int) -> str:
    if kind == "lm_head":
        return f"lm_heads.{head}.weight"
    return f"blocks.{head}.layers.{layer}.{kind}"


_VLLM_BLOCK = re.compile(r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)")
_VLLM_LM_HEAD = re.compile(r"lm_heads\.(\d+)\.weight")


def _vllm_normalise_key(name: str) -> str:
    """Key renaming exactly as vLLM 0.32 ``Medusa.load_weights`` does it."""
    name = name.replace("medusa_heads.", "")
    parts = name.split(".")
    if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
        head, layer, rest = parts[0], parts[1], parts[2:]
        if "linear" in rest:
            return f"blocks.{head}.layers.{layer}." + ".".join(rest[rest.index("linear") + 1 :])
        return f"lm_heads.{head}." + ".".join(rest)
    return name


def _vllm_config_counts(raw: dict) -> dict:
    """vLLM's MedusaConfig.from_pretrained renames any key with "num" and "heads"/"layers"."""
    counts: dict = {}
    for key, value in raw.items():
        if "num" in key and "heads" in key:
            counts["num_heads"] = value
        elif "num" in key and "layers" in key:
            counts["num_hidden_layers"] = value
    return counts


def _find_vllm_weights(folder: Path) -> Path:
    if (folder / VLLM_WEIGHTS).exists():
        return folder / VLLM_WEIGHTS
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(
        f"{folder}: weight file missing, looked for {folder / VLLM_WEIGHTS} "
        f"(or a single *.safetensors file; found {[c.name for c in candidates]})"
    )


def _load_vllm(folder: Path, raw: dict, **kwargs) -> tuple[MedusaHeads, Path]:
    config_file = folder / CONFIG_FILE
    weights_file = _find_vllm_weights(folder)
    vocab_size = raw.get("vocab_size")
    truncated = raw.get("truncated_vocab_size")
    if truncated is not None and vocab_size is not None and truncated < vocab_size:
        # vLLM scores only the token_map rows and sets the rest to -inf: re-expanding that into
        # full-vocabulary heads is not exact (top-k over the full vocabulary differs).
        raise CheckpointError(
            f"{config_file} has truncated_vocab_size {truncated} < vocab_size {vocab_size} "
            "(token_map draft vocabulary): not supported by this reader"
        )
    fc_bias = bool(raw.get("medusa_fc_bias", False))
    original_lm_head = bool(raw.get("original_lm_head", False))
    meta = raw.get(VLLM_EXPORT_META_KEY) if isinstance(raw.get(VLLM_EXPORT_META_KEY), dict) else {}

    found = _HeadTensors()
    single_lm_head: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for name, tensor in _read_tensors(weights_file).items():
        short = _vllm_normalise_key(name)
        if match := _VLLM_BLOCK.fullmatch(short):
            head, layer, kind = int(match[1]), int(match[2]), match[3]
            (found.weights if kind == "weight" else found.biases)[(head, layer)] = tensor
        elif match := _VLLM_LM_HEAD.fullmatch(short):
            found.lm_heads[int(match[1])] = tensor
        elif short == "lm_head.weight":
            single_lm_head[name] = tensor
        elif short == "token_map":
            # vLLM ignores token_map unless the vocabulary is truncated (refused above).
            warnings.warn(
                f"{weights_file}: ignoring 'token_map' (no truncated vocabulary)", stacklevel=3
            )
        else:
            ignored.append(name)

    if original_lm_head:
        # vLLM builds one LM head for all heads from 'lm_head.weight' or 'lm_heads.0.weight'.
        candidates = list(single_lm_head.values())
        if 0 in found.lm_heads:
            candidates.append(found.lm_heads[0])
        if not candidates:
            raise CheckpointError(
                f"{weights_file}: {config_file} sets original_lm_head but there is no "
                "'lm_heads.0.weight' (or 'lm_head.weight')"
            )
        if any(not torch.equal(c, candidates[0]) for c in candidates[1:]):
            raise CheckpointError(
                f"{weights_file}: 'lm_head.weight' and 'lm_heads.0.weight' differ; "
                "with original_lm_head vLLM would use either"
            )
        # vLLM ignores lm_heads.{h>0} here: the head count comes from the blocks.
        block_heads = [h for h, _ in found.weights] + [h for h, _ in found.biases]
        if block_heads:
            num_heads = max(block_heads) + 1
        else:
            num_heads = int(_vllm_config_counts(raw).get("num_heads", 1))
        found.lm_heads = {h: candidates[0] for h in range(num_heads)}
    elif single_lm_head:
        ignored.extend(single_lm_head)
    if ignored:
        warnings.warn(
            f"{weights_file}: ignoring tensors vLLM does not load: {ignored[:8]}", stacklevel=3
        )

    if found.biases and not fc_bias:
        warnings.warn(
            f"{config_file} lacks medusa_fc_bias=true: vLLM itself would drop the ResBlock "
            f"biases in {weights_file}; they are kept here",
            stacklevel=3,
        )

    num_heads = found.num_heads()
    for config_key, inferred in (
        ("num_heads", num_heads),
        ("num_hidden_layers", found.num_layers()),
    ):
        declared = _vllm_config_counts(raw).get(config_key)
        if declared is not None and declared != inferred:
            warnings.warn(
                f"{config_file} says {config_key}={declared} but {weights_file} holds "
                f"{inferred}; using {inferred} from the weights",
                stacklevel=3,
            )

    # Our own export of shared-LM-head heads: the copies are the base LM head, drop them.
    shared = bool(meta.get("shared_lm_head")) and all(
        torch.equal(w, found.lm_heads[0]) for w in found.lm_heads.values()
    )
    if shared:
        vocab_size = int(found.lm_heads[0].shape[0])
        found.lm_heads = {}
    heads = _assemble(
        weights_file,
        found,
        _vllm_key,
        shared_lm_head=shared,
        missing_biases="error" if fc_bias else "zero",
        vocab_size=vocab_size,
        hidden_size=raw.get("hidden_size"),
        base_model_name_or_path=meta.get("base_model_name_or_path"),
        extra=meta.get("extra"),
        **kwargs,
    )
    for name in ("hidden_size", "vocab_size"):
        declared = raw.get(name)
        if declared is not None and declared != getattr(heads.config, name):
            raise CheckpointError(
                f"{weights_file} has {name} {getattr(heads.config, name)} "
                f"but {config_file} says {declared}"
            )
    return heads, weights_file


def export_vllm(
    heads: MedusaHeads,
    out_dir: str | Path,
    base_lm_head_weight: torch.Tensor | None = None,
    *,
    original_lm_head: bool = False,
    tree: list[list[int]] | None = None,
    topk: int = 10,
    max_paths: int = 64,
) -> Path:
    """Write a folder vLLM 0.32 loads with ``{"method": "medusa", "model": out_dir}``.

    ``medusa_fc_bias`` is always true: without it vLLM silently drops the ResBlock biases.
    Shared-LM-head heads need ``base_lm_head_weight``; it is written as every head's
    ``lm_heads.{h}.weight``, or once when ``original_lm_head`` (vLLM then holds a single copy).
    """
    config = heads.config
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # vLLM reads every *.safetensors (else *.bin, *.pt) in the folder: ours must be alone.
    strays = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    strays = [s for s in strays if s != VLLM_WEIGHTS]
    if strays:
        raise ValueError(f"{folder} already holds weight files vLLM would also read: {strays}")

    if heads.lm_head_weight is None:
        if base_lm_head_weight is None:
            raise ValueError(
                "these heads share the base model's LM head: pass base_lm_head_weight "
                "so it can be written as the heads' lm_heads.{h}.weight"
            )
        expected = (config.vocab_size, config.hidden_size)
        if tuple(base_lm_head_weight.shape) != expected:
            raise ValueError(
                f"base_lm_head_weight has shape {tuple(base_lm_head_weight.shape)}, "
                f"heads expect {expected} (vocab, hidden)"
            )
        lm_heads = [base_lm_head_weight.to(heads.block_weight.dtype)] * config.num_heads
    else:
        if original_lm_head:
            raise ValueError("original_lm_head is only for heads that share the base LM head")
        lm_heads = [heads.lm_head_weight[h] for h in range(config.num_heads)]

    tensors: dict[str, torch.Tensor] = {}
    for h in range(config.num_heads):
        for layer in range(config.num_layers):
            tensors[_vllm_key("weight", h, layer)] = heads.block_weight[h, layer]
            tensors[_vllm_key("bias", h, layer)] = heads.block_bias[h, layer]
        if not original_lm_head or h == 0:
            tensors[_vllm_key("lm_head", h, 0)] = lm_heads[h]
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(folder / VLLM_WEIGHTS), metadata={"format": "pt"})

    vllm_config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "max_paths": max_paths,
        "topk": topk,
        "truncated_vocab_size": config.vocab_size,
        "medusa_fc_bias": True,
        "original_lm_head": original_lm_head,
        VLLM_EXPORT_META_KEY: {
            "format_version": FORMAT_VERSION,
            "shared_lm_head": config.shared_lm_head,
            "base_model_name_or_path": config.base_model_name_or_path,
            "extra": config.extra,
        },
    }
    (folder / CONFIG_FILE).write_text(json.dumps(vllm_config, indent=2) + "\n")
    if tree is not None:
        _write_tree_file(folder, tree)
    return folder


# --------------------------------------------------------------------------------------
# Detection and loading
# --------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """Name of the checkpoint format of a folder, from its file names and config only.

    Rules, in order: ``config.json`` with ``"format": "vllm-medusa"`` -> canonical;
    a ``medusa_lm_head.safetensors``/``.pt`` file -> FasterDecoding (reported as
    ``fasterdecoding-v0.1``; :func:`load_heads` tells the shared variant apart from the keys);
    ``config.json`` with ``model_type: "medusa"`` or ``MedusaModel`` -> vLLM layout.
    """
    return _detect(Path(path))[0]


def _detect(folder: Path) -> tuple[str, dict, Path | None]:
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (a Medusa checkpoint is a folder)")
    config_file = folder / CONFIG_FILE
    raw = _read_json(config_file) if config_file.exists() else {}
    fd_weights = next((folder / n for n in FASTERDECODING_WEIGHTS if (folder / n).exists()), None)
    if raw.get("format") == FORMAT_NAME:
        return CANONICAL, raw, None
    if is_sequential_config(raw):
        return SEQUENTIAL, raw, None
    if fd_weights is not None:
        return FASTERDECODING_V01, raw, fd_weights
    architectures = raw.get("architectures") or []
    if raw.get("model_type") == "medusa" or "MedusaModel" in architectures:
        return VLLM, raw, None
    if any(k.startswith("medusa_num_") for k in raw):
        raise CheckpointError(
            f"{folder}: weight file missing, looked for "
            + " and ".join(str(folder / n) for n in FASTERDECODING_WEIGHTS)
        )
    raise CheckpointError(
        f"{folder}: unknown Medusa checkpoint format; expected {CONFIG_FILE} with "
        f'"format": "{FORMAT_NAME}" + {CANONICAL_WEIGHTS} (canonical), '
        f"{' or '.join(FASTERDECODING_WEIGHTS)} (FasterDecoding), or {CONFIG_FILE} with "
        f'"model_type": "medusa" + {VLLM_WEIGHTS} (vLLM); '
        f"found {sorted(p.name for p in folder.iterdir())}"
    )


def load_heads(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    expected_hidden_size: int | None = None,
    expected_vocab_size: int | None = None,
) -> MedusaHeads | SequentialHeads:
    """Load Medusa heads from a folder of any supported format (auto-detected).

    The result carries ``heads.checkpoint_info`` (:class:`CheckpointInfo`: format, files, raw
    config and the folder's ``tree.json`` paths if any).
    """
    folder = Path(path)
    fmt, raw, fd_weights = _detect(folder)
    if fmt == SEQUENTIAL:
        try:
            heads = load_sequential_heads(
                folder,
                raw,
                dtype=dtype,
                expected_hidden_size=expected_hidden_size,
                expected_vocab_size=expected_vocab_size,
            )
        except SequentialCheckpointError as e:
            raise CheckpointError(str(e)) from e
        heads.checkpoint_info = CheckpointInfo(
            format=fmt,
            path=folder,
            weights_file=folder / CANONICAL_WEIGHTS,
            raw_config=raw,
            tree=read_tree_file(folder),
        )
        return heads
    kwargs = {
        "dtype": dtype,
        "expected_hidden_size": expected_hidden_size,
        "expected_vocab_size": expected_vocab_size,
    }
    if fmt == CANONICAL:
        heads, weights_file = _load_canonical(folder, raw, **kwargs)
    elif fmt == VLLM:
        heads, weights_file = _load_vllm(folder, raw, **kwargs)
    else:
        assert fd_weights is not None
        heads, weights_file, fmt = _load_fasterdecoding(folder, raw, fd_weights, **kwargs)
    heads.checkpoint_info = CheckpointInfo(
        format=fmt,
        path=folder,
        weights_file=weights_file,
        raw_config=raw,
        tree=read_tree_file(folder),
    )
    return heads
