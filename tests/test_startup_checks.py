"""Engine features tree Medusa refuses at start, each named (pure checks, no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_medusa.integration.options import MedusaConfigError
from vllm_medusa.integration.startup_checks import (
    attention_problems,
    engine_config_problems,
    refuse,
)


def _config(**overrides):
    hf = SimpleNamespace(**overrides.pop("hf", {}))
    window = overrides.pop("sliding_window", None)
    model = SimpleNamespace(
        hf_text_config=hf,
        get_sliding_window=lambda: window,
        uses_mrope=overrides.pop("uses_mrope", False),
        logits_processors=overrides.pop("logits_processors", None),
        logprobs_mode=overrides.pop("logprobs_mode", "raw_logprobs"),
    )
    config = SimpleNamespace(
        model_config=model,
        cache_config=SimpleNamespace(cache_dtype=overrides.pop("cache_dtype", "auto")),
        parallel_config=SimpleNamespace(tensor_parallel_size=overrides.pop("tp", 1)),
        scheduler_config=SimpleNamespace(
            long_prefill_token_threshold=overrides.pop("long_prefill", 0)
        ),
    )
    assert not overrides
    return config


def _problems(config, num_nodes=8, is_chain=False, budget="auto", platform="cpu"):
    return engine_config_problems(config, num_nodes, is_chain, budget, platform)


def test_a_plain_cpu_engine_has_no_problems():
    assert _problems(_config()) == []
    assert _problems(_config(long_prefill=9)) == []  # room for 1 + 8 tree tokens
    assert _problems(_config(tp=2), budget="full") == []
    assert _problems(_config(logprobs_mode="raw_logits")) == []
    assert _problems(_config(), is_chain=True, platform="cuda") == []  # chains are exact


@pytest.mark.parametrize(
    ("kwargs", "config", "message"),
    [
        ({"platform": "cuda"}, {}, "CPU backend only, not on cuda"),
        ({}, {"sliding_window": 4096}, "sliding-window attention"),
        ({}, {"hf": {"layer_types": ["sliding_attention", "full_attention"]}}, "sliding-window"),
        ({}, {"hf": {"attn_logit_softcapping": 50.0}}, "attention logit soft-capping"),
        ({}, {"uses_mrope": True}, "M-RoPE"),
        ({}, {"cache_dtype": "fp8_e4m3"}, "fp8 KV cache"),
        ({}, {"tp": 2}, "draft_budget='auto' under tensor parallelism"),
        ({}, {"long_prefill": 8}, "long_prefill_token_threshold=8 is below one tree"),
        ({}, {"logits_processors": ["pkg.Proc"]}, "custom logits processors"),
        ({}, {"logprobs_mode": "processed_logprobs"}, "logprobs_mode='processed_logprobs'"),
        ({}, {"logprobs_mode": "processed_logits"}, "logprobs_mode='processed_logits'"),
    ],
)
def test_engine_features_are_refused_by_name(kwargs, config, message):
    problems = _problems(_config(**config), **kwargs)
    assert len(problems) == 1 and message in problems[0], problems
    with pytest.raises(MedusaConfigError, match="cannot serve this engine exactly"):
        refuse(problems)


def _impl(**attrs):
    base = {"sliding_window": -1, "logits_soft_cap": 0, "sinks": None, "alibi_slopes": None}
    return SimpleNamespace(**{**base, "is_fp8_kv_cache": False, **attrs})


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"sliding_window": (127, 0)}, "sliding-window attention"),
        ({"logits_soft_cap": 30.0}, "attention logit soft-capping"),
        ({"sinks": object()}, "attention sinks"),
        ({"alibi_slopes": object()}, "ALiBi"),
        ({"is_fp8_kv_cache": True}, "fp8 KV cache"),
    ],
)
def test_attention_layer_features_are_refused_by_name(attrs, message):
    assert attention_problems([object()], [_impl(), _impl()]) == []
    problems = attention_problems([object()], [_impl(), _impl(**attrs)])
    assert len(problems) == 1 and message in problems[0], problems


def test_several_kv_cache_groups_are_refused():
    problems = attention_problems([object(), object()], [_impl()])
    assert problems == ["the model has 2 KV-cache groups (mixed attention types)"]


@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits"])
def test_emitted_logprobs_are_what_vllms_sampler_reports(mode):
    """Tree tokens' logprobs use the sampler's own values for the served logprobs modes."""
    import torch
    from vllm.v1.sample.sampler import Sampler

    from vllm_medusa.integration.runner_patches import emitted_logprobs

    sampler = Sampler(logprobs_mode=mode)
    logits = torch.randn(5, 11)
    got = emitted_logprobs(sampler, logits)
    want = logits if mode == "raw_logits" else torch.log_softmax(logits, dim=-1)
    assert torch.allclose(got, want, atol=1e-6)
    assert got.data_ptr() != logits.data_ptr()  # never a view the caller could change
