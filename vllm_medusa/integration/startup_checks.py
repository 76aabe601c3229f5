"""What tree Medusa cannot serve exactly, refused at engine start with the feature named.

Pure functions over vLLM's config objects and attention layers (read by attribute only, so the
tests pass stand-ins); the proposer and the warm-up patch call them.

- The tree attention fix-up (:mod:`.tree_attention`) recomputes the rows vLLM's CPU kernel
  masks wrongly with plain softmax attention over the request's cached K/V: it has no sliding
  window, attention logit soft-capping, attention sinks, ALiBi or fp8 K/V, and reads the
  first KV-cache group only; tree positions are one number per token (no M-RoPE).
- Tree attention exists for the CPU backend only: elsewhere only a chain is exact (the
  index-causal kernel is right for every node of a chain).
- The draft budget's timings (``auto``) are taken on one worker: not under tensor parallelism.
- A ``long_prefill_token_threshold`` below one tree (1 + nodes tokens) would cut a request's
  verification step short.
- The fix-up and the KV compaction read K/V straight from vLLM's CPU pages: each ISA's packing
  is checked against vLLM's own cache writer once the KV cache exists (:func:`check_kv_layouts`),
  so an unknown packing fails at start, not at the first tree step.
"""

from __future__ import annotations

from vllm_medusa.integration.options import MedusaConfigError


def _text_config(model_config):
    return getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)


# Logprobs of emitted tokens come from the raw logits of the node before each token (the
# processed values would need the sampler's per-request processing at every tree node).
SERVED_LOGPROBS_MODES = ("raw_logprobs", "raw_logits")


def engine_config_problems(
    vllm_config, num_nodes: int, is_chain: bool, draft_budget: str, platform: str
) -> list[str]:
    """Each feature of this engine that tree Medusa cannot serve, as a sentence."""
    problems = []
    model_config = vllm_config.model_config
    hf = _text_config(model_config)
    if platform != "cpu" and not is_chain:
        problems.append(
            f"tree attention is implemented for the CPU backend only, not on {platform}: "
            "use a chain tree (e.g. tree='chain-4') there"
        )
    window = model_config.get_sliding_window()
    layer_types = getattr(hf, "layer_types", None) or ()
    if window is not None or "sliding_attention" in layer_types:
        problems.append("the model uses sliding-window attention")
    if getattr(hf, "attn_logit_softcapping", None):
        problems.append("the model uses attention logit soft-capping")
    if model_config.uses_mrope:
        problems.append("the model uses M-RoPE (multimodal rotary positions)")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype.startswith("fp8"):
        problems.append(f"the KV cache is {cache_dtype} (fp8 KV cache)")
    if vllm_config.parallel_config.tensor_parallel_size > 1 and draft_budget == "auto":
        problems.append("draft_budget='auto' under tensor parallelism: use draft_budget='full'")
    threshold = vllm_config.scheduler_config.long_prefill_token_threshold
    if 0 < threshold < num_nodes + 1:
        problems.append(
            f"long_prefill_token_threshold={threshold} is below one tree verification "
            f"({num_nodes + 1} tokens)"
        )
    if getattr(model_config, "logits_processors", None):
        problems.append("custom logits processors (logits_processors) are configured")
    mode = getattr(model_config, "logprobs_mode", "raw_logprobs")
    if mode not in SERVED_LOGPROBS_MODES:
        problems.append(
            f"logprobs_mode={mode!r}: logprobs of accepted tree tokens are served for "
            f"{' and '.join(SERVED_LOGPROBS_MODES)} only"
        )
    return problems


def attention_problems(kv_cache_groups, attention_impls) -> list[str]:
    """Problems found on the built model: KV-cache groups and the attention layers' impls."""
    problems = []
    if len(kv_cache_groups) > 1:
        problems.append(
            f"the model has {len(kv_cache_groups)} KV-cache groups (mixed attention types)"
        )
    features = {
        "sliding-window attention": lambda i: getattr(i, "sliding_window", None) not in (None, -1),
        "attention logit soft-capping": lambda i: bool(getattr(i, "logits_soft_cap", 0)),
        "attention sinks": lambda i: getattr(i, "sinks", None) is not None,
        "ALiBi": lambda i: getattr(i, "alibi_slopes", None) is not None,
        "an fp8 KV cache": lambda i: bool(getattr(i, "is_fp8_kv_cache", False)),
    }
    for name, has in features.items():
        if any(has(impl) for impl in attention_impls):
            problems.append(f"attention layers use {name}")
    return problems


def refuse(problems: list[str]) -> None:
    if problems:
        raise MedusaConfigError(
            "tree Medusa cannot serve this engine exactly: " + "; ".join(problems)
        )


def check_engine(vllm_config, tree, draft_budget: str) -> None:
    """Refuse, at engine start, an engine config tree Medusa cannot serve exactly."""
    from vllm.platforms import current_platform

    is_chain = max(tree.nodes_per_depth()) == 1
    platform = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
    refuse(engine_config_problems(vllm_config, tree.num_nodes, is_chain, draft_budget, platform))


def check_kv_layouts(layers) -> list[str]:
    """Check every CPU attention layer's K/V packing (one write/read per ISA, on a scratch
    page) against what tree attention reads; raise :class:`KVCacheLayoutError` naming the ISA
    if it differs. Returns the ISAs checked (none off CPU: only the CPU backend sets ``isa``)."""
    from vllm_medusa.integration import tree_attention

    checked = []
    for layer in layers:
        isa, kv = getattr(layer, "isa", None), getattr(layer, "kv_cache", None)
        kv = kv[0] if isinstance(kv, (list, tuple)) and kv else kv
        if isa is None or kv is None or kv.dim() != 4 or isa in checked:
            continue
        tree_attention.check_kv_layout(layer, kv)
        checked.append(isa)
    return checked


def check_model(runner) -> list[str]:
    """Refuse, once the model and its KV cache are built, what the tree attention cannot do.
    Returns the ISAs whose K/V packing was checked."""
    layers = list(runner.compilation_config.static_forward_context.values())
    impls = [layer.impl for layer in layers if hasattr(layer, "impl")]
    refuse(attention_problems(runner.kv_cache_config.kv_cache_groups, impls))
    return check_kv_layouts(layers)
