"""vLLM engine arguments for tree Medusa, in one place (no vLLM import).

``LLM(model, **medusa_engine_kwargs(heads_dir))`` or the server flags from
:func:`medusa_server_args` give vLLM a speculative config whose ``num_speculative_tokens``
matches the tree (one draft token per tree node) and the tree options in
``additional_config["medusa"]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_medusa.core.checkpoint import load_heads, read_tree_file
from vllm_medusa.core.tree import MedusaTree, chain_paths


def resolve_serving_tree(heads_dir: str | Path, tree: Any = None) -> MedusaTree:
    """The tree a server will use: ``tree`` if given, else the heads folder's ``tree.json``,
    else a top-1 chain over all heads. Validated against the heads."""
    heads = load_heads(heads_dir)
    if tree is None:
        paths = read_tree_file(heads_dir)
        if paths is None:
            paths = chain_paths(heads.num_heads)
        return MedusaTree.from_paths(paths, num_heads=heads.num_heads, source=str(heads_dir))
    return MedusaTree.resolve(tree, num_heads=heads.num_heads)


def medusa_engine_kwargs(heads_dir: str | Path, tree: Any = None, **options: Any) -> dict:
    """``speculative_config`` and ``additional_config`` for ``vllm.LLM`` / ``EngineArgs``."""
    resolved = resolve_serving_tree(heads_dir, tree)
    medusa_options: dict[str, Any] = dict(options)
    if isinstance(tree, (str, Path)) and Path(tree).is_file():
        medusa_options["tree"] = str(Path(tree).resolve())  # workers may run elsewhere
    elif tree is not None:
        medusa_options["tree"] = tree if isinstance(tree, str) else resolved.to_json()
    return {
        "speculative_config": {
            "method": "medusa",
            "model": str(Path(heads_dir).resolve()),
            "num_speculative_tokens": resolved.num_nodes,
        },
        "additional_config": {"medusa": medusa_options},
    }


def medusa_server_args(heads_dir: str | Path, tree: Any = None, **options: Any) -> list[str]:
    """The same as OpenAI-server flags (``--speculative-config``, ``--additional-config``)."""
    kwargs = medusa_engine_kwargs(heads_dir, tree, **options)
    return [
        "--speculative-config",
        json.dumps(kwargs["speculative_config"]),
        "--additional-config",
        json.dumps(kwargs["additional_config"]),
    ]
