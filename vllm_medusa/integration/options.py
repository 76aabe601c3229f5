"""The ``additional_config["medusa"]`` options, parsed and validated at engine start."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CONFIG_KEY = "medusa"
ACCEPTANCE_METHODS = ("greedy", "typical", "exact")
DRAFT_BUDGETS = ("auto", "full")


class MedusaConfigError(ValueError):
    """A Medusa configuration that cannot be served, found at engine start."""


@dataclass(frozen=True)
class MedusaTreeOptions:
    """User options for tree Medusa in vLLM.

    - ``tree``: a preset name (``mc_sim_7b_63``, ``chain-4``, ...), a JSON file, or an explicit
      list of rank paths. Default: the heads folder's ``tree.json``, else a top-1 chain over
      all heads.
    - ``acceptance``: how sampled requests (temperature > 0) verify drafts; greedy requests
      are always verified greedily (lossless). ``greedy`` (default): sampled requests get no
      drafts (plain decoding). ``typical``: Medusa's typical acceptance with ``typical_eps``
      (default 0.09) and ``typical_delta`` (default 0.3). ``exact``: tree rejection sampling,
      which keeps the request's distribution exactly. A request may override all three
      through ``SamplingParams.extra_args`` (:mod:`.tree_sampling`). Requests that use
      penalties, logit biases, bad words, min_tokens or structured output are served with
      plain decoding (no drafts for them) in every mode.
    - ``draft_budget``: ``auto`` (default) drafts, each step, the breadth-first prefix of the
      tree (possibly empty: plain decoding) with the best expected tokens per second, from a
      step-cost table measured at engine start and running per-node acceptance rates
      (:mod:`vllm_medusa.core.draft_budget`); ``full`` always drafts the whole tree.
    - ``draft_min_gain`` (``auto`` only, default 0.05): draft only when the predicted tokens per
      second beat plain decoding's by this fraction; a margin against errors in the
      estimates, so that break-even drafting does not make serving slower.
    """

    tree: Any = None
    acceptance: str = "greedy"
    draft_budget: str = "auto"
    typical_eps: float = 0.09
    typical_delta: float = 0.3
    draft_min_gain: float = 0.05

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> MedusaTreeOptions:
        raw = {}
        if isinstance(additional_config, dict):
            raw = additional_config.get(CONFIG_KEY) or {}
        if not isinstance(raw, dict):
            raise MedusaConfigError(
                f"additional_config[{CONFIG_KEY!r}] must be a dict, got {type(raw).__name__}"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MedusaConfigError(
                f"unknown option(s) {unknown} in additional_config[{CONFIG_KEY!r}]; "
                f"known options: {sorted(known)}"
            )
        options = cls(**raw)
        if options.acceptance not in ACCEPTANCE_METHODS:
            raise MedusaConfigError(
                f"unknown acceptance method {options.acceptance!r}; "
                f"supported: {list(ACCEPTANCE_METHODS)}"
            )
        for name in ("typical_eps", "typical_delta"):
            value = getattr(options, name)
            if not is_positive_number(value):
                raise MedusaConfigError(f"{name} must be a number > 0, got {value!r}")
        gain = options.draft_min_gain
        if not (is_positive_number(gain) or (gain == 0 and not isinstance(gain, bool))):
            raise MedusaConfigError(f"draft_min_gain must be a number >= 0, got {gain!r}")
        if options.draft_budget not in DRAFT_BUDGETS:
            raise MedusaConfigError(
                f"unknown draft_budget {options.draft_budget!r}; supported: {list(DRAFT_BUDGETS)}"
            )
        return options


def is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
