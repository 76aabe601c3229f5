"""vllm-medusa: full Medusa speculative decoding for vLLM.

``vllm_medusa.core`` is plain PyTorch and never imports vLLM. Everything that touches vLLM
internals lives in ``vllm_medusa.integration`` and is installed by :func:`register`, the
``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (runs in every engine and worker process).

    Harmless when no Medusa tree is configured: the patches it installs only change
    behaviour for engines whose ``speculative_config.method`` is ``medusa``.
    """
    from vllm_medusa.integration import install

    install()
