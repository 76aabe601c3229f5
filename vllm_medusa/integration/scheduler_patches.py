"""One small, named patch of vLLM 0.32's V1 ``Scheduler`` (engine-core process).

- ``Scheduler.__init__``: for Medusa engines, ``dynamic_sd_lookup`` is set to a table that
  gives ``num_speculative_tokens`` for every batch size. The scheduler reads that table in
  two places only (vLLM 0.32 ``v1/core/sched/scheduler.py``): ``num_spec_tokens_to_schedule``
  (unchanged: the table's value is the configured one, and the tree proposer ignores it) and
  the padding of new and resumed decode requests to ``1 + num_speculative_tokens`` tokens with
  ``-1`` placeholder drafts "to preserve full cudagraph", which a non-empty table turns off.
  Placeholders would cost a whole tree of compute per new request even when the draft budget
  drafts nothing, and would count as proposed-and-rejected drafts in vLLM's metrics. Only the
  tree proposer decides who drafts, and how much.
"""

from __future__ import annotations

import functools

from vllm.v1.core.sched.scheduler import Scheduler


def uses_tree_medusa(vllm_config) -> bool:
    spec = getattr(vllm_config, "speculative_config", None)
    return spec is not None and spec.method == "medusa"


def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        if uses_tree_medusa(vllm_config) and self.dynamic_sd_lookup is None:
            max_batch = self.scheduler_config.max_num_seqs
            self.dynamic_sd_lookup = [self.num_spec_tokens] * (max_batch + 1)

    __init__.__vllm_medusa_patch__ = True
    return __init__


def patch_scheduler() -> None:
    """Install the scheduler patch once per process."""
    if getattr(Scheduler.__init__, "__vllm_medusa_patch__", False):
        return
    Scheduler.__init__ = _wrap_init(Scheduler.__init__)
