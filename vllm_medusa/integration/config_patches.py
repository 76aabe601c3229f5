"""One small, named patch of vLLM 0.32's engine arguments (the process that builds configs).

- ``EngineArgs.create_speculative_config``: with ``method="medusa"`` and no
  ``num_speculative_tokens``, the number is derived from the tree (one draft token per node:
  the heads folder in ``speculative_config["model"]`` plus ``additional_config["medusa"]``,
  resolved as the proposer will resolve it). vLLM's own error would only say that the number
  is missing. A given number is left alone: the proposer checks it and names the right one.

``EngineArgs.__post_init__`` loads the general plugins (vLLM 0.32 ``engine/arg_utils.py``)
before any config is built, on the ``LLM(...)`` path and on the OpenAI server's
(``AsyncEngineArgs.from_cli_args``), so the patch is in place whenever this method runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

from vllm.engine.arg_utils import EngineArgs

from vllm_medusa.integration.options import MedusaConfigError, MedusaTreeOptions


def num_tree_nodes(heads_dir, additional_config) -> int:
    """Draft tokens per step for these heads and options: the number of tree nodes."""
    from vllm_medusa.core.checkpoint import load_heads
    from vllm_medusa.integration.proposer import resolve_tree

    if not heads_dir:
        raise MedusaConfigError(
            "speculative_config['model'] must name the Medusa heads folder for method 'medusa'"
        )
    options = MedusaTreeOptions.from_additional_config(additional_config)
    heads = load_heads(heads_dir)
    return resolve_tree(options, Path(heads_dir), heads.num_heads).num_nodes


def fill_num_speculative_tokens(engine_args) -> None:
    """Set ``num_speculative_tokens`` for a Medusa engine that left it out."""
    spec = dict(engine_args.speculative_config or {})
    spec = {k.replace("-", "_"): v for k, v in spec.items()}
    method = spec.get("method", engine_args.spec_method)
    given = spec.get("num_speculative_tokens", engine_args.spec_tokens)
    if method != "medusa" or given is not None:
        return
    spec["num_speculative_tokens"] = num_tree_nodes(
        spec.get("model", engine_args.spec_model), engine_args.additional_config
    )
    engine_args.speculative_config = spec


def _wrap_create_speculative_config(original):
    @functools.wraps(original)
    def create_speculative_config(self, *args, **kwargs):
        fill_num_speculative_tokens(self)
        return original(self, *args, **kwargs)

    create_speculative_config.__vllm_medusa_patch__ = True
    return create_speculative_config


def patch_engine_args() -> None:
    """Install the engine-argument patch once per process."""
    if getattr(EngineArgs.create_speculative_config, "__vllm_medusa_patch__", False):
        return
    EngineArgs.create_speculative_config = _wrap_create_speculative_config(
        EngineArgs.create_speculative_config
    )
