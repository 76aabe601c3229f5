"""Which requests tree verification may draft for (no engine): every SamplingParams field."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

# Every SamplingParams field of vLLM 0.32: a non-default value, and whether a greedy request
# with it may still get drafts (greedy tree verification reproduces it exactly).
FIELDS = {
    "n": (2, True),
    "presence_penalty": (0.5, False),
    "frequency_penalty": (0.5, False),
    "repetition_penalty": (1.2, False),
    "temperature": (0.8, False),
    "watermarking": (True, True),  # V1 runner: no watermark (it needs V2, which has no Medusa)
    "top_p": (0.5, True),  # top-p, top-k and min-p keep the argmax
    "top_k": (5, True),
    "min_p": (0.5, True),
    "seed": (3, True),
    "stop": (["x"], True),  # stops are checked token by token on the accepted path
    "stop_token_ids": ([5], True),
    "ignore_eos": (True, True),
    "max_tokens": (5, True),
    "min_tokens": (3, False),  # masks stop tokens: changes the argmax
    "logprobs": (2, True),
    "prompt_logprobs": (2, True),
    "prompt_logprob_token_ids": ([[1]], True),
    "prompt_logprob_start": (1, True),
    "logprob_token_ids": ([1, 2], False),
    "flat_logprobs": (True, True),
    "detokenize": (False, True),
    "skip_special_tokens": (False, True),
    "spaces_between_special_tokens": (False, True),
    "include_stop_str_in_output": (True, True),
    "output_kind": ("DELTA", True),
    "stream_interval": (4, True),
    "skip_clone": (True, True),
    "output_text_buffer_length": (3, True),
    "_eos_token_id": (2, True),
    "_all_stop_token_ids": ({2}, True),
    "_watermarking_skipped": (True, True),
    "structured_outputs": ("json", False),
    "logit_bias": ({5: 3.0}, False),
    "allowed_token_ids": ([1, 2, 3], False),
    "extra_args": ({"anything": 1}, True),  # custom logits processors are refused at start
    "bad_words": (["x"], False),
    "_bad_words_token_ids": ([[5]], False),
    "skip_reading_prefix_cache": (True, True),
    "thinking_token_budget": (10, False),
    "repetition_detection": ("params", True),  # ends generation, checked token by token
    "routed_experts_prompt_start": (1, True),
    "trace_decode_token_ids": ([1, 2], False),  # forces tokens
}


def _value(name, value):
    from vllm.sampling_params import (
        RepetitionDetectionParams,
        RequestOutputKind,
        StructuredOutputsParams,
    )

    if name == "output_kind":
        return RequestOutputKind.DELTA
    if name == "structured_outputs":
        return StructuredOutputsParams(json={"type": "object"})
    if name == "repetition_detection":
        return RepetitionDetectionParams(max_pattern_size=4, min_count=3)
    return value


def test_every_sampling_params_field_is_classified():
    from vllm import SamplingParams

    assert set(SamplingParams.__struct_fields__) == set(FIELDS), (
        "SamplingParams changed: classify the new fields for request_can_speculate"
    )


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_request_can_speculate_per_field(name):
    from vllm import SamplingParams

    from vllm_medusa.integration.proposer import request_can_speculate

    greedy = SamplingParams(temperature=0.0)
    assert request_can_speculate(greedy)
    value, expected = FIELDS[name]
    # Set after construction: some fields are private, and __post_init__ would normalise
    # others (e.g. bad words to token ids need a tokenizer).
    setattr(greedy, name, _value(name, value))
    assert request_can_speculate(greedy) is expected
    assert request_can_speculate(None) is False
