"""Drafts travel with the step's output: no extra worker round trip per step.

vLLM 0.32's engine core (without async scheduling, as on CPU) asks the worker for the next
step's drafts after every step of a speculative engine (``EngineCore.post_step`` ->
``take_draft_token_ids``): a second RPC per step. Behind the OpenAI server the worker is
another process and that round trip cost ~1.2 ms a step here (~3% of a 4-request decode
step), paid even when the draft budget drafts nothing. For tree Medusa engines:

- ``GPUModelRunner.sample_tokens`` (worker): the drafts it just made ride on its
  ``ModelRunnerOutput`` (``vllm_medusa_draft_token_ids``; ``None`` when there are none);
- ``Scheduler.update_from_output`` (engine core): keeps them for the post-step hook;
- ``EngineCore.post_step``: hands them to the scheduler exactly as vLLM would, and skips the
  RPC. Any step whose output carries no such field (another engine, async scheduling, an
  empty step) goes through vLLM's own hook unchanged.
"""

from __future__ import annotations

import functools

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.core import EngineCore
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

DRAFTS_FIELD = "vllm_medusa_draft_token_ids"
_NONE = object()  # the last output carried no drafts field


def _wrap_sample_tokens(original, is_tree_runner):
    @functools.wraps(original)
    def sample_tokens(self, grammar_output):
        output = original(self, grammar_output)
        if (
            is_tree_runner(self)
            and not self.use_async_scheduling
            and isinstance(output, ModelRunnerOutput)
            and output is not EMPTY_MODEL_RUNNER_OUTPUT  # a shared constant
        ):
            setattr(output, DRAFTS_FIELD, self.take_draft_token_ids())
        return output

    sample_tokens.__vllm_medusa_patch__ = True
    return sample_tokens


def _wrap_update_from_output(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output):
        self._vllm_medusa_drafts = getattr(model_runner_output, DRAFTS_FIELD, _NONE)
        return original(self, scheduler_output, model_runner_output)

    update_from_output.__vllm_medusa_patch__ = True
    return update_from_output


def _wrap_post_step(original):
    @functools.wraps(original)
    def post_step(self, model_executed: bool) -> None:
        drafts = getattr(self.scheduler, "_vllm_medusa_drafts", _NONE)
        self.scheduler._vllm_medusa_drafts = _NONE
        if drafts is _NONE or not model_executed or self.async_scheduling:
            return original(self, model_executed)
        if self.check_for_draft_tokens and drafts is not None:
            self.scheduler.update_draft_token_ids(drafts)

    post_step.__vllm_medusa_patch__ = True
    return post_step


def patch_engine(is_tree_runner) -> None:
    """Install the three patches once per process (``is_tree_runner(runner)``: whether a
    model runner serves tree Medusa)."""
    if getattr(EngineCore.post_step, "__vllm_medusa_patch__", False):
        return
    GPUModelRunner.sample_tokens = _wrap_sample_tokens(GPUModelRunner.sample_tokens, is_tree_runner)
    Scheduler.update_from_output = _wrap_update_from_output(Scheduler.update_from_output)
    EngineCore.post_step = _wrap_post_step(EngineCore.post_step)
