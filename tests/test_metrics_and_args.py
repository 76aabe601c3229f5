"""Spec-decode summaries and engine arguments (no engine started)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vllm_medusa.core.checkpoint import save_heads
from vllm_medusa.core.heads import MedusaConfig, MedusaHeads
from vllm_medusa.core.tree import TreeError
from vllm_medusa.engine_args import medusa_engine_kwargs, medusa_server_args
from vllm_medusa.metrics import summarize_prometheus, summarize_vllm_metrics


def _metric(name, value=None, values=None):
    return SimpleNamespace(name=name, value=value, values=values)


def test_summary_from_llm_metrics():
    # 10 steps with drafts: 6 accepted depth 1, 3 of them depth 2, 1 of those depth 3.
    s = summarize_vllm_metrics(
        [
            _metric("vllm:spec_decode_num_drafts", 10),
            _metric("vllm:spec_decode_num_draft_tokens", 630),
            _metric("vllm:spec_decode_num_accepted_tokens", 10),
            _metric("vllm:spec_decode_num_accepted_tokens_per_pos", values=[6, 3, 1, 0]),
            _metric("vllm:prompt_tokens", 5),
        ]
    )
    assert s.tau == pytest.approx(2.0)
    assert s.accepted_length_distribution() == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert sum(s.accepted_length_distribution()) == pytest.approx(1.0)
    assert "tau 2.000" in s.format()


def test_summary_without_drafts():
    s = summarize_vllm_metrics([])
    assert s.tau == 1.0 and s.accepted_length_distribution() == [1.0]


def test_summary_from_prometheus_text():
    text = "\n".join(
        [
            "# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
            'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 4.0',
            'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 32.0',
            'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 6.0',
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 4.0',
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="1"} 2.0',
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="2"} 0.0',
        ]
    )
    s = summarize_prometheus(text)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (4, 32, 6)
    assert s.accepted_per_position == [4, 2, 0]
    assert s.tau == pytest.approx(2.5)
    assert s.accepted_length_distribution() == pytest.approx([0.0, 0.5, 0.5])


@pytest.fixture
def heads_dir(tmp_path):
    heads = MedusaHeads(
        MedusaConfig(hidden_size=8, vocab_size=16, num_heads=3, shared_lm_head=True)
    )
    return save_heads(heads, tmp_path / "heads", tree=[[0], [1], [0, 0]])


def test_engine_kwargs_use_the_heads_tree(heads_dir):
    kwargs = medusa_engine_kwargs(heads_dir)
    assert kwargs["speculative_config"]["method"] == "medusa"
    assert kwargs["speculative_config"]["num_speculative_tokens"] == 3
    assert kwargs["additional_config"] == {"medusa": {}}


def test_engine_kwargs_with_preset_and_paths(heads_dir):
    assert (
        medusa_engine_kwargs(heads_dir, "chain-2")["speculative_config"]["num_speculative_tokens"]
        == 2
    )
    explicit = medusa_engine_kwargs(heads_dir, [[0], [0, 0], [0, 0, 0], [1]])
    assert explicit["speculative_config"]["num_speculative_tokens"] == 4
    assert explicit["additional_config"]["medusa"]["tree"] == [[0], [1], [0, 0], [0, 0, 0]]
    args = medusa_server_args(heads_dir, "chain-3")
    assert json.loads(args[args.index("--speculative-config") + 1])["num_speculative_tokens"] == 3


def test_engine_kwargs_reject_a_tree_deeper_than_the_heads(heads_dir):
    with pytest.raises(TreeError, match="only 3 Medusa heads"):
        medusa_engine_kwargs(heads_dir, "chain-4")


def test_serve_flags_carry_the_acceptance_option(heads_dir):
    import argparse

    from vllm_medusa.serve import build_command, configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    for flags, expected in [
        ([], {}),
        (["--medusa-acceptance", "typical"], {"acceptance": "typical"}),
        (
            ["--medusa-acceptance", "exact", "--medusa-draft-budget", "full"],
            {"acceptance": "exact", "draft_budget": "full"},
        ),
    ]:
        args = parser.parse_args(["model", "--medusa-heads", str(heads_dir), *flags])
        command = build_command(args)
        config = json.loads(command[command.index("--additional-config") + 1])
        assert config == {"medusa": expected}
    with pytest.raises(SystemExit):
        parser.parse_args(["model", "--medusa-heads", str(heads_dir), "--medusa-acceptance", "x"])
