"""The benchmark's bookkeeping (no engine): speedups, identity, percentiles, spec deltas."""

from __future__ import annotations

from vllm_medusa.bench import Result, _percentile, _spec_delta, compare_to_plain, format_table
from vllm_medusa.metrics import SpecDecodeSummary


def _result(config, concurrency, tokens, seconds, outputs, tau=1.0):
    return Result(config, concurrency, len(outputs), tokens, seconds, tau, outputs=outputs)


def test_speedup_and_identity_are_against_plain_at_the_same_concurrency():
    results = [
        _result("plain", 1, 100, 10.0, ["a", "b"]),
        _result("plain", 4, 100, 2.0, ["a", "b"]),
        _result("tree-auto", 1, 100, 5.0, ["a", "b"], tau=2.0),
        _result("tree-auto", 4, 100, 4.0, ["a", "c"], tau=2.0),
    ]
    compare_to_plain(results)
    by = {(r.config, r.concurrency): r for r in results}
    assert by["tree-auto", 1].speedup == 2.0 and by["tree-auto", 1].identical_to_plain
    assert by["tree-auto", 4].speedup == 0.5 and not by["tree-auto", 4].identical_to_plain
    table = format_table(results)
    assert "| tree-auto | 4 | 25.0 | 0.50x | 2.00 |" in table and "NO" in table


def test_spec_counters_are_taken_as_differences_over_one_level():
    before = SpecDecodeSummary(10, 40, 8, [6, 2])
    after = SpecDecodeSummary(30, 120, 48, [26, 14, 8])
    delta = _spec_delta(before, after)
    assert delta["tau"] == 1 + 40 / 20
    assert delta["accepted_per_depth"] == [1.0, 0.6, 0.4]
    assert _spec_delta(after, after) == {"tau": 1.0, "accepted_per_depth": []}


def test_percentiles_pick_observed_values():
    values = [float(v) for v in range(1, 101)]
    assert _percentile(values, 50) in (50.0, 51.0)
    assert _percentile(values, 99) == 99.0
    assert _percentile([], 50) is None


def test_configuration_names_carry_acceptance_and_preload():
    import pytest

    from vllm_medusa.bench import parse_config

    assert parse_config("tree-auto/typical+preload") == ("tree-auto", "typical", True)
    assert parse_config("plain") == ("plain", None, False)
    for bad in ("ngram/typical", "tree-full/sloppy", "beam"):
        with pytest.raises(SystemExit):
            parse_config(bad)


def test_paired_runs_pool_and_compare_with_their_own_plain_turns():
    from vllm_medusa.bench import abba_order, pool_runs

    assert abba_order(1) == [0, 1]
    assert abba_order(3) == [0, 1, 1, 0, 0, 1]
    plain = pool_runs([_result("plain", 4, 100, 2.0, ["a"]), _result("plain", 4, 100, 3.0, ["a"])])
    assert (plain.output_tokens, plain.seconds, plain.runs, plain.outputs) == (200, 5.0, 2, ["a"])
    mine = pool_runs(
        [_result("tree-auto", 4, 100, 1.0, ["a"]), _result("tree-auto", 4, 100, 1.5, ["a"])],
        {"tau": 1.5, "accepted_per_depth": [0.5]},
    )
    mine.reference_tokens_per_s, mine.reference_outputs = plain.tokens_per_s, plain.outputs
    # An unpaired plain row at the same concurrency (e.g. pooled over other pairings) is
    # not what a paired result is compared with.
    other_plain = _result("plain", 4, 100, 0.5, ["b"])
    compare_to_plain([other_plain, mine])
    assert mine.speedup == 2.0 and mine.identical_to_plain and mine.tau == 1.5
    # Passes that disagree are never reported identical.
    flaky = pool_runs([_result("ngram", 4, 10, 1.0, ["a"]), _result("ngram", 4, 10, 1.0, ["c"])])
    flaky.reference_tokens_per_s, flaky.reference_outputs = 10.0, ["a"]
    compare_to_plain([flaky])
    assert flaky.outputs is None and flaky.identical_to_plain is False
