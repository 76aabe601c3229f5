"""Sampled requests with trees, without an engine: which requests speculate in each mode,
per-request options, and the target distribution against vLLM's own sampler ops."""

from __future__ import annotations

import pytest
import torch

from tests.test_request_eligibility import FIELDS, _value

pytestmark = pytest.mark.vllm


def _options(**kw):
    from vllm_medusa.integration.options import MedusaTreeOptions

    return MedusaTreeOptions(**kw)


@pytest.mark.parametrize("mode", ["greedy", "typical", "exact"])
@pytest.mark.parametrize("name", sorted(FIELDS))
def test_sampled_request_can_speculate_per_field(mode, name):
    """A sampled request speculates under typical / exact exactly when a greedy one would
    (same parameter audit); under greedy it never does."""
    from vllm import SamplingParams

    from vllm_medusa.integration.proposer import request_can_speculate

    options = _options(acceptance=mode)
    sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=1)
    assert request_can_speculate(sampled, options) is (mode != "greedy")
    assert request_can_speculate(sampled) is False  # no options: greedy-only callers
    if name == "temperature":
        sampled.temperature = 0.0
        assert request_can_speculate(sampled, options)  # greedy: verified greedily in any mode
        return
    value, expected = FIELDS[name]
    setattr(sampled, name, _value(name, value))
    assert request_can_speculate(sampled, options) is (expected and mode != "greedy")


def test_per_request_override():
    from vllm import SamplingParams

    from vllm_medusa.integration.proposer import request_can_speculate
    from vllm_medusa.integration.tree_sampling import request_acceptance

    engine = _options()  # greedy by default
    sp = SamplingParams(temperature=0.7, extra_args={"medusa_acceptance": "typical"})
    assert request_can_speculate(sp, engine)
    acc = request_acceptance(sp, engine)
    assert (acc.mode, acc.eps, acc.delta) == ("typical", 0.09, 0.3)
    sp = SamplingParams(
        temperature=0.7,
        extra_args={"medusa_acceptance": "typical", "medusa_typical_eps": 0.2},
    )
    assert request_acceptance(sp, _options(typical_delta=0.5)).eps == 0.2
    assert request_acceptance(sp, _options(typical_delta=0.5)).delta == 0.5
    sp = SamplingParams(temperature=0.7, extra_args={"medusa_acceptance": "greedy"})
    assert not request_can_speculate(sp, _options(acceptance="exact"))
    # greedy requests stay greedy whatever they ask for
    sp = SamplingParams(temperature=0.0, extra_args={"medusa_acceptance": "exact"})
    assert request_acceptance(sp, engine).mode == "greedy"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"medusa_acceptance": "sampled"}, "unknown medusa_acceptance 'sampled'"),
        ({"medusa_typical_eps": 0}, "medusa_typical_eps must be a number > 0, got 0"),
        ({"medusa_typical_delta": "x"}, "medusa_typical_delta must be a number > 0, got 'x'"),
    ],
)
def test_bad_request_options_are_named(extra, message):
    from vllm import SamplingParams

    from vllm_medusa.integration.proposer import request_can_speculate
    from vllm_medusa.integration.tree_sampling import MedusaRequestError, request_acceptance

    sp = SamplingParams(temperature=0.7, extra_args=extra)
    with pytest.raises(MedusaRequestError, match=message):
        request_acceptance(sp, _options(acceptance="typical"))
    # the engine never raises on them: such a request decodes plainly
    assert not request_can_speculate(sp, _options(acceptance="typical"))


def test_bad_engine_options_fail():
    from vllm_medusa.integration.options import MedusaConfigError, MedusaTreeOptions

    for raw, message in [
        ({"acceptance": "sampled"}, "unknown acceptance method 'sampled'"),
        ({"typical_eps": -1}, "typical_eps must be a number > 0"),
        ({"typical_delta": True}, "typical_delta must be a number > 0"),
    ]:
        with pytest.raises(MedusaConfigError, match=message):
            MedusaTreeOptions.from_additional_config({"medusa": raw})
    opts = MedusaTreeOptions.from_additional_config(
        {"medusa": {"acceptance": "exact", "typical_eps": 0.2}}
    )
    assert (opts.acceptance, opts.typical_eps, opts.typical_delta) == ("exact", 0.2, 0.3)


def test_target_probs_matches_vllm_sampler_ops():
    """temperature -> min-p -> top-k / top-p as vLLM 0.32's sampler processes one row."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from vllm_medusa.core.tree_sampling import target_probs

    gen = torch.Generator().manual_seed(0)
    r, v = 64, 300
    logits = torch.randn(r, v, generator=gen) * 3
    temperature = torch.rand(r, generator=gen) + 0.3
    top_k = torch.randint(1, v + 1, (r,), generator=gen)
    top_k[::4] = v  # off
    top_p = torch.rand(r, generator=gen) * 0.9 + 0.1
    top_p[1::4] = 1.0
    min_p = torch.rand(r, generator=gen) * 0.2
    min_p[2::4] = 0.0
    ours = target_probs(logits, temperature, top_k, top_p, min_p)
    # vLLM: temperature, then MinPLogitsProcessor.apply, then apply_top_k_top_p
    x = logits / temperature[:, None]
    p = x.softmax(-1)
    x = x.masked_fill(p < p.amax(-1, keepdim=True) * min_p[:, None], float("-inf"))
    x = apply_top_k_top_p_pytorch(x.clone(), top_k.to(torch.int32), top_p)
    theirs = x.softmax(-1)
    assert torch.equal(ours > 0, theirs > 0)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # top-k alone (no sort of the vocabulary), as vLLM's CPU path
    ours = target_probs(logits, temperature, top_k)
    x = apply_top_k_top_p_pytorch(
        (logits / temperature[:, None]).clone(), top_k.to(torch.int32), None, allow_cpu_sync=True
    )
    assert torch.allclose(ours, x.softmax(-1), atol=1e-6)
    assert torch.equal(ours > 0, x.softmax(-1) > 0)


def test_input_processor_refuses_bad_request_options_as_a_client_error():
    """What the OpenAI server turns into a 400: VLLMValidationError naming the value."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from vllm_medusa.integration.tree_sampling import _wrap_validate_params

    calls = []
    validate = _wrap_validate_params(lambda self, params, tasks: calls.append(params) or True)

    def processor(method):
        spec = SimpleNamespace(method=method)
        config = SimpleNamespace(speculative_config=spec, additional_config={})
        return SimpleNamespace(vllm_config=config)

    bad = SamplingParams(temperature=0.7, extra_args={"medusa_acceptance": "fast"})
    with pytest.raises(VLLMValidationError, match="unknown medusa_acceptance 'fast'"):
        validate(processor("medusa"), bad, ())
    good = SamplingParams(temperature=0.7, extra_args={"medusa_acceptance": "exact"})
    assert validate(processor("medusa"), good, ()) is True
    assert validate(processor("eagle"), bad, ()) is True  # not a Medusa engine: not ours
    assert len(calls) == 3  # vLLM's own validation always runs first


def test_tau_per_acceptance_mode_is_counted_and_logged(monkeypatch):
    from types import SimpleNamespace

    from vllm_medusa.integration import tree_sampling

    drafter = SimpleNamespace()
    logged = []
    monkeypatch.setattr(tree_sampling, "STATS_LOG_EVERY", 2)
    monkeypatch.setattr(tree_sampling.logger, "info", lambda msg, arg: logged.append(arg))
    # step 1: rows 0 (greedy) and 2 (exact) verified, row 1 had no drafts
    tree_sampling._record_modes(drafter, ["greedy", None, "exact"])
    tree_sampling.record_accepted(drafter, torch.tensor([3, 0, 1]))
    tree_sampling._record_modes(drafter, ["typical", "exact"])
    tree_sampling.record_accepted(drafter, torch.tensor([2, 0]))
    stats = tree_sampling.mode_stats(drafter)
    assert stats.tau("greedy") == 4.0 and stats.tau("exact") == 1.5 and stats.tau("typical") == 3
    assert logged == [{"greedy": 4.0, "typical": 3.0, "exact": 1.5}]
