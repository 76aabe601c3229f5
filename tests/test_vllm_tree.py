"""Tree Medusa inside vLLM on CPU: lossless greedy decoding, token for token (fp32).

Every engine runs in its own subprocess (vllm_medusa/engine_job.py). The reference is plain
vLLM on the same prompts. Engines run eager (``enforce_eager``): torch.compile costs ~70 s per
engine start on CPU and its cache does not reload in vLLM 0.32, which would dominate these short
jobs; one MT-Bench test runs compiled so that the compiled graph with tree attention is covered.
"""

from __future__ import annotations

import pytest

from tests.conftest import DEMOTED_RANK, ORACLE_MAX_TOKENS, ORACLE_PROMPTS
from tests.vllm_jobs import (
    SHIPPED_HEADS,
    first_divergence,
    run_engine_job,
    run_engine_job_expecting_failure,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MT_BENCH_MAX_TOKENS = 256
ENGINE = {"max_model_len": 2048, "enforce_eager": True}


@pytest.fixture(scope="module")
def mt_bench_prompts():
    from vllm_medusa.data import mt_bench_first_turns

    prompts = mt_bench_first_turns()
    assert len(prompts) == 80
    return prompts


@pytest.fixture(scope="module")
def serving_heads(oracle_heads):
    """The shipped trained heads with their calibrated tree (oracle heads until they exist)."""
    return SHIPPED_HEADS if (SHIPPED_HEADS / "config.json").exists() else oracle_heads


# Tests of the tree machinery draft the whole tree every step; the default draft budget
# ("auto", which may draft less or nothing when that is faster) has its own tests.
FULL_TREE = {"draft_budget": "full"}


def _pair(tmp_path, name, model, job, heads, tree=None, env=None):
    plain = run_engine_job({"model": str(model), **job}, tmp_path, f"{name}-plain", env=env)
    return plain, _medusa(tmp_path, name, model, job, heads, tree, env)


def _medusa(tmp_path, name, model, job, heads, tree=None, env=None, options=FULL_TREE):
    medusa = {"heads": str(heads), "tree": tree, "options": options}
    return run_engine_job(
        {"model": str(model), "medusa": medusa, **job},
        tmp_path,
        f"{name}-medusa",
        env=env,
    )


def _assert_identical(plain, medusa):
    assert medusa["token_ids"] == plain["token_ids"], first_divergence(
        plain["token_ids"], medusa["token_ids"]
    )
    assert medusa["finish_reasons"] == plain["finish_reasons"]
    assert medusa["texts"] == plain["texts"]
    assert medusa["spec"] is not None and medusa["spec"]["num_drafts"] > 0


def _mt_bench_job(prompts, **extra):
    return {
        "engine": ENGINE,
        "prompts": prompts,
        "sampling": {"temperature": 0, "max_tokens": MT_BENCH_MAX_TOKENS},
        "kv_cache_gib": 2,
        **extra,
    }


@pytest.fixture(scope="module")
def mt_bench_plain(tmp_path_factory, smollm2_dir, mt_bench_prompts):
    """Plain vLLM's greedy answers to the 80 first turns, all submitted at once.

    Also the reference for the one-at-a-time run: plain greedy fp32 decoding on CPU gives the
    same tokens batched and alone (checked on MT-Bench prompts before relying on it), and
    running the 80 x 256 plain requests one at a time would cost ~10 more minutes of CI.
    """
    job = _mt_bench_job(mt_bench_prompts)
    return run_engine_job(
        {"model": str(smollm2_dir), **job}, tmp_path_factory.mktemp("mtb"), "mtb-plain"
    )


def test_mt_bench_all_at_once_is_lossless(
    tmp_path, smollm2_dir, mt_bench_prompts, serving_heads, mt_bench_plain
):
    job = _mt_bench_job(mt_bench_prompts)
    medusa = _medusa(tmp_path, "mtb-batch", smollm2_dir, job, serving_heads)
    _assert_identical(mt_bench_plain, medusa)
    print(f"80 MT-Bench prompts at once: tau {medusa['spec']['tau']:.3f}")


def test_mt_bench_one_at_a_time_is_lossless(
    tmp_path, smollm2_dir, mt_bench_prompts, serving_heads, mt_bench_plain
):
    # Compiled (vLLM's default): 20k single-request steps repay the compile, and the compiled
    # graph calling the tree attention backend gets covered. Default options: the draft
    # budget decides per step how much of the tree pays on this machine.
    job = _mt_bench_job(mt_bench_prompts, one_at_a_time=True)
    job["engine"] = {**ENGINE, "enforce_eager": False}
    medusa = _medusa(tmp_path, "mtb-single", smollm2_dir, job, serving_heads, options={})
    _assert_identical(mt_bench_plain, medusa)
    spec = medusa["spec"]
    print(f"80 MT-Bench prompts one at a time: tau {spec['tau']:.3f}, {spec}")


ORACLE_JOB = {
    "engine": ENGINE,
    "prompts": ORACLE_PROMPTS,
    "sampling": {"temperature": 0, "max_tokens": ORACLE_MAX_TOKENS},
}


@pytest.fixture(scope="module")
def oracle_plain(tmp_path_factory, smollm2_dir):
    """Plain vLLM's greedy continuations of ORACLE_PROMPTS (what the oracle heads memorised)."""
    return run_engine_job(
        {"model": str(smollm2_dir), **ORACLE_JOB}, tmp_path_factory.mktemp("oracle"), "plain"
    )


# A published 63-node tree plus the branch the demoted oracle heads' text lies on.
OFF_RANK_TREE = "mc_sim_7b_63"
OFF_RANK_BRANCH = [[2], [2, 2], [2, 2, 2], [2, 2, 2, 2]]


def test_deep_acceptance_off_the_rank_0_chain(
    tmp_path, smollm2_dir, demoted_oracle_heads, oracle_plain
):
    """Whole paths accepted (KV compaction at every step) on a 63-node published tree, off the
    rank-0 chain: heads that rank the true token 3rd at every depth (two decoys above it)
    draft the text on the branch [2, 2, 2, 2] only (tree masks for nodes that are not first
    children, KV compaction from far slots)."""
    from vllm_medusa.core.tree import MedusaTree
    from vllm_medusa.metrics import SpecDecodeSummary

    assert DEMOTED_RANK == 2
    published = [list(p) for p in MedusaTree.resolve(OFF_RANK_TREE, num_heads=4).paths]
    tree = MedusaTree.from_paths(
        published + [p for p in OFF_RANK_BRANCH if p not in published], num_heads=4
    )
    paths = [list(p) for p in tree.paths]
    medusa = _medusa(tmp_path, "off-rank", smollm2_dir, ORACLE_JOB, demoted_oracle_heads, paths)
    _assert_identical(oracle_plain, medusa)
    spec = medusa["spec"]
    summary = SpecDecodeSummary(
        spec["num_drafts"],
        spec["num_draft_tokens"],
        spec["num_accepted_tokens"],
        spec["accepted_per_position"],
    )
    # 4 heads: up to 4 drafts + 1 bonus per step; memorised text accepts nearly all of them.
    assert summary.tau > 3.5, summary.format()
    lengths = summary.accepted_length_distribution()  # P(exactly d drafts accepted)
    assert len(lengths) == 5 and sum(lengths[3:]) > 0.5, summary.format()
    accepted = medusa["medusa_counters"]["accepted_per_node"]  # per node, since start
    by_path = {tuple(p): accepted[m] for m, p in enumerate(paths)}
    assert by_path[(0,)] == by_path[(1,)] == by_path[(0, 0, 0)] == 0, by_path
    assert by_path[(2, 2, 2)] > 0 and by_path[(2, 2, 2, 2)] > 0, by_path
    # Every step that accepted 3 or 4 drafts did so through node [2, 2, 2], then [2, 2, 2, 2].
    assert by_path[(2, 2, 2)] == spec["accepted_per_position"][2], by_path
    assert by_path[(2, 2, 2, 2)] == spec["accepted_per_position"][3], by_path


def test_deep_acceptance_with_oracle_sequential_heads(
    tmp_path, smollm2_dir, oracle_sequential_heads, oracle_plain
):
    """Sequential heads fill the tree depth by depth from each node's own path (the bonus
    token first, through vLLM's embedding); memorised text accepts whole 4-deep paths."""
    medusa = _medusa(
        tmp_path, "oracle-seq", smollm2_dir, ORACLE_JOB, oracle_sequential_heads, "mc_sim_7b_63"
    )
    _assert_identical(oracle_plain, medusa)
    spec = medusa["spec"]
    assert spec["tau"] > 3.5, spec
    assert spec["accepted_per_position"][3] > 0, spec


def test_draft_budget_keeps_drafting_heads_that_are_accepted(
    tmp_path, smollm2_dir, oracle_heads, oracle_plain
):
    """The default cost-aware budget: lossless, and a chain that is always accepted pays on
    any machine (4 accepted drafts for at most 5x the tokens of a plain step), so it stays."""
    medusa = _medusa(
        tmp_path, "budget", smollm2_dir, ORACLE_JOB, oracle_heads, "chain-4", options={}
    )
    _assert_identical(oracle_plain, medusa)
    assert medusa["spec"]["tau"] > 3.0, medusa["spec"]


def test_draft_budget_stops_drafting_heads_that_are_never_accepted(
    tmp_path, smollm2_dir, oracle_plain
):
    """Identity heads (zero residual blocks over the shared LM head) re-predict the token just
    emitted, which the text almost never repeats: the default budget stops drafting after its
    optimistic start, re-testing the heads only now and then; output stays identical."""
    import json

    from vllm_medusa.core.checkpoint import save_heads
    from vllm_medusa.core.heads import MedusaConfig, MedusaHeads

    base = json.loads((smollm2_dir / "config.json").read_text())
    config = MedusaConfig(
        hidden_size=base["hidden_size"],
        vocab_size=base["vocab_size"],
        num_heads=4,
        shared_lm_head=True,
    )
    heads = save_heads(MedusaHeads(config), tmp_path / "identity-heads")
    medusa = _medusa(tmp_path, "budget-idle", smollm2_dir, ORACLE_JOB, heads, "chain-4", options={})
    assert medusa["token_ids"] == oracle_plain["token_ids"]
    spec = medusa["spec"]
    decode_steps = sum(len(t) for t in oracle_plain["token_ids"])  # an upper bound
    assert spec is not None and spec["num_drafts"] > 0, "the budget never tried the heads"
    assert spec["num_drafts"] < 0.3 * decode_steps, (spec, decode_steps)
    print(f"identity heads: {spec['num_drafts']} drafting steps of ~{decode_steps}: {spec}")


def test_stops_inside_accepted_paths(tmp_path, smollm2_dir, oracle_heads, oracle_plain):
    """max_tokens, stop strings and stop tokens landing mid-path end exactly like plain."""
    from transformers import AutoTokenizer

    reference = oracle_plain
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts, sampling = [], []
    for prompt, ids in zip(ORACLE_PROMPTS, reference["token_ids"], strict=True):
        for max_tokens in (1, 2, 3, 6, 11):
            prompts.append(prompt)
            sampling.append({"temperature": 0, "max_tokens": max_tokens})
        for cut in (7, 13):  # a stop token and a stop string from inside the continuation
            prompts.append(prompt)
            sampling.append({"temperature": 0, "max_tokens": 40, "stop_token_ids": [ids[cut]]})
            prompts.append(prompt)
            sampling.append(
                {"temperature": 0, "max_tokens": 40, "stop": [tok.decode(ids[cut : cut + 2])]}
            )
    job = {"engine": ENGINE, "prompts": prompts, "sampling_per_prompt": sampling}
    plain, medusa = _pair(tmp_path, "stops", smollm2_dir, job, oracle_heads, "mc_sim_7b_63")
    _assert_identical(plain, medusa)
    assert {"length", "stop"} <= set(medusa["finish_reasons"])


def test_preemption_with_small_kv_cache(tmp_path, smollm2_dir, mt_bench_prompts, oracle_heads):
    prompts = ORACLE_PROMPTS * 2 + mt_bench_prompts[:8]
    job = {
        # 16 blocks of 32 tokens cannot hold 16 requests: the scheduler preempts and
        # recomputes, and resumed requests come back with placeholder drafts.
        "engine": {
            **ENGINE,
            "max_model_len": 448,
            "block_size": 32,
            "num_gpu_blocks_override": 16,
        },
        "prompts": prompts,
        "sampling": {"temperature": 0, "max_tokens": 64},
    }
    plain, medusa = _pair(tmp_path, "preempt", smollm2_dir, job, oracle_heads, "mc_sim_7b_63")
    _assert_identical(plain, medusa)
    assert medusa["counters"]["vllm:num_preemptions"] > 0, medusa["counters"]
    assert medusa["medusa_counters"]["tree_steps"] > 0


def test_prefix_caching(tmp_path, smollm2_dir, oracle_heads):
    """Repeated prompts hit the prefix cache (requests start with computed tokens); then each
    request's prompt + output, as a new prompt, hits the blocks tree verification wrote
    (accepted nodes compacted into place), and continues exactly as plain decoding."""
    block_size = 32
    job = {
        "engine": {**ENGINE, "enable_prefix_caching": True, "block_size": block_size},
        "prompts": ORACLE_PROMPTS * 2,
        "sampling": {"temperature": 0, "max_tokens": ORACLE_MAX_TOKENS},
        "one_at_a_time": True,
        "continue": {"temperature": 0, "max_tokens": 16},
    }
    plain, medusa = _pair(tmp_path, "prefix", smollm2_dir, job, oracle_heads, "mc_sim_7b_63")
    _assert_identical(plain, medusa)
    cont, plain_cont = medusa["continuations"], plain["continuations"]
    assert cont["prompt_token_ids"] == plain_cont["prompt_token_ids"]
    assert cont["token_ids"] == plain_cont["token_ids"], first_divergence(
        plain_cont["token_ids"], cont["token_ids"]
    )
    for ids, out, hits, plain_hits in zip(
        cont["prompt_token_ids"],
        medusa["token_ids"],
        cont["prefix_cache_hits"],
        plain_cont["prefix_cache_hits"],
        strict=True,
    ):
        prompt_blocks = (len(ids) - len(out)) // block_size * block_size
        # Blocks past the original prompt's were written while the first request decoded,
        # i.e. by tree verification (the oracle heads accept most of each answer). vLLM
        # caches a block when it schedules past it, so the tokens accepted in a request's
        # last step may miss the cache that plain decoding (one token per step) fills.
        assert prompt_blocks < hits <= plain_hits == (len(ids) - 1) // block_size * block_size
    assert medusa["spec"]["tau"] > 2.5, medusa["spec"]


def test_chunked_prefill_with_long_prompts(tmp_path, smollm2_dir, oracle_heads):
    """Long prompts prefilled in chunks share steps with requests decoding a tree."""
    from vllm_medusa.data import load_sharegpt_prompts

    long_prompts = [p for p in load_sharegpt_prompts(limit=400) if 2500 < len(p) < 5000][:3]
    assert len(long_prompts) == 3
    job = {
        "engine": {
            **ENGINE,
            "max_model_len": 4096,
            "enable_chunked_prefill": True,
            # Room for the four 64-token trees plus a 256-token prefill chunk per step.
            "max_num_batched_tokens": 512,
        },
        "prompts": ORACLE_PROMPTS + long_prompts,
        "sampling": {"temperature": 0, "max_tokens": ORACLE_MAX_TOKENS},
        "kv_cache_gib": 2,
    }
    plain, medusa = _pair(tmp_path, "chunked", smollm2_dir, job, oracle_heads, "mc_sim_7b_63")
    _assert_identical(plain, medusa)
    assert medusa["medusa_counters"]["tree_steps_with_prefill"] > 0, medusa["medusa_counters"]


def test_requests_that_cannot_speculate_decode_plainly(tmp_path, smollm2_dir, oracle_heads):
    """Sampling, penalties, logprobs and prompt logprobs in one batch with tree requests.

    Decision (documented in the README): such requests get no drafts and are decoded exactly
    as without Medusa; greedy requests in the same batch keep speculating.
    """
    base = {"temperature": 0, "max_tokens": 24}
    sampling = [
        base,
        {"temperature": 0.8, "seed": 7, "max_tokens": 24},
        {**base, "repetition_penalty": 1.3},
        {**base, "logprobs": 3},
        {**base, "prompt_logprobs": 2},
        {**base, "min_tokens": 5},
    ]
    prompts = [ORACLE_PROMPTS[i % len(ORACLE_PROMPTS)] for i in range(len(sampling))]
    job = {"engine": ENGINE, "prompts": prompts, "sampling_per_prompt": sampling}
    plain, medusa = _pair(tmp_path, "fallback", smollm2_dir, job, oracle_heads, "mc_sim_7b_63")
    _assert_identical(plain, medusa)
    for k in (3,):
        for a, b in zip(plain["logprobs"][k], medusa["logprobs"][k], strict=True):
            assert a.keys() == b.keys()
            for t in a:
                assert abs(a[t] - b[t]) < 1e-3
    for a, b in zip(plain["prompt_logprobs"][4][1:], medusa["prompt_logprobs"][4][1:], strict=True):
        assert a.keys() == b.keys()


def test_near_the_context_limit_only_eligible_requests_draft(tmp_path, smollm2_dir, oracle_heads):
    """Generations that run into a small max_model_len with a 63-node tree.

    Past ``max_model_len - 63`` tokens vLLM's own fallback would give every request 63 zero
    drafts (sampled ones included) and skip the proposer; with two requests at a time, the
    1-token prompt is admitted while another request decodes, where vLLM would pad it with 63
    placeholder drafts. Sampled requests must never draft; greedy ones stay identical.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)

    def chat(prompt):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tok(text, add_special_tokens=False)["input_ids"]

    greedy = {"temperature": 0, "max_tokens": 200}
    sampled = {"temperature": 0.8, "seed": 11, "max_tokens": 200}
    prompts = [chat(ORACLE_PROMPTS[0]), chat(ORACLE_PROMPTS[1]), [tok.encode("The")[0]]]
    prompts += [chat(ORACLE_PROMPTS[2])]
    sampling = [greedy, sampled, sampled, greedy]
    engine = {**ENGINE, "max_model_len": 128, "max_num_seqs": 2}
    job = {"engine": engine, "prompt_token_ids": prompts, "sampling_per_prompt": sampling}
    plain = run_engine_job({"model": str(smollm2_dir), **job}, tmp_path, "limit-plain")
    job["engine"] = {**engine, "per_request_spec_decode_metrics": "summary"}
    medusa = _medusa(tmp_path, "limit", smollm2_dir, job, oracle_heads, "mc_sim_7b_63")
    drafts = medusa["draft_tokens"]
    assert drafts[1] == 0 and drafts[2] == 0, drafts  # sampled: never a draft
    assert drafts[0] > 0 and drafts[3] > 0, drafts
    for k in (0, 3):
        assert medusa["token_ids"][k] == plain["token_ids"][k], first_divergence(
            [plain["token_ids"][k]], [medusa["token_ids"][k]]
        )
        assert medusa["finish_reasons"][k] == plain["finish_reasons"][k] == "length"


@pytest.mark.parametrize(
    ("medusa", "message"),
    [
        ({"tree": "no_such_tree"}, "unknown tree preset 'no_such_tree'"),
        ({"tree": [[0], [0, 0, 0]]}, "has no parent"),
        ({"tree": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]}, "only 4 Medusa heads"),
        ({"options": {"accept": "greedy"}}, "unknown option"),
        ({"options": {"draft_budget": "some"}}, "unknown draft_budget 'some'"),
        ({"options": {"acceptance": "sampled"}}, "unknown acceptance method 'sampled'"),
    ],
)
def test_bad_configuration_fails_at_start(tmp_path, smollm2_dir, oracle_heads, medusa, message):
    job = {
        "model": str(smollm2_dir),
        "engine": ENGINE,
        "prompts": ["hi"],
        "medusa": {"heads": str(oracle_heads), **medusa},
    }
    stderr = run_engine_job_expecting_failure(job, tmp_path, "bad")
    assert message in stderr


def test_num_speculative_tokens_must_match_tree(tmp_path, smollm2_dir, oracle_heads):
    job = {
        "model": str(smollm2_dir),
        "engine": {
            **ENGINE,
            "speculative_config": {
                "method": "medusa",
                "model": str(oracle_heads),
                "num_speculative_tokens": 5,
            },
            "additional_config": {"medusa": {"tree": "mc_sim_7b_63"}},
        },
        "prompts": ["hi"],
    }
    stderr = run_engine_job_expecting_failure(job, tmp_path, "bad-k")
    assert "set num_speculative_tokens=63" in stderr


def test_engine_features_tree_medusa_cannot_serve_fail_at_start(
    tmp_path, smollm2_dir, oracle_heads
):
    """One engine-level refusal (the others are unit tests of startup_checks): a long-prefill
    threshold that would cut a 64-token verification step short."""
    job = {
        "model": str(smollm2_dir),
        "engine": {**ENGINE, "long_prefill_token_threshold": 16},
        "prompts": ["hi"],
        "medusa": {"heads": str(oracle_heads), "tree": "mc_sim_7b_63"},
    }
    stderr = run_engine_job_expecting_failure(job, tmp_path, "bad-threshold")
    assert "long_prefill_token_threshold=16 is below one tree verification (64 tokens)" in stderr


def test_heads_for_another_model_fail_at_start(tmp_path, smollm2_dir):
    from vllm_medusa.core.checkpoint import save_heads
    from vllm_medusa.core.heads import MedusaConfig, MedusaHeads

    wrong = tmp_path / "wrong-heads"
    save_heads(MedusaHeads(MedusaConfig(hidden_size=64, vocab_size=49152, num_heads=2)), wrong)
    job = {
        "model": str(smollm2_dir),
        "engine": {
            **ENGINE,
            "speculative_config": {
                "method": "medusa",
                "model": str(wrong),
                "num_speculative_tokens": 2,
            },
        },
        "prompts": ["hi"],
    }
    stderr = run_engine_job_expecting_failure(job, tmp_path, "bad-heads")
    assert "hidden size 64" in stderr and "576" in stderr


def test_disabling_the_plugin_gives_vllm_chain_medusa(
    tmp_path, smollm2_dir, oracle_heads, oracle_plain
):
    """VLLM_PLUGINS without medusa_tree: vLLM's own top-1 chain Medusa on the same heads."""
    from safetensors.torch import load_file

    from vllm_medusa.core.checkpoint import export_vllm, load_heads

    heads = load_heads(oracle_heads)
    lm_head = load_file(smollm2_dir / "model.safetensors")
    base_w = lm_head.get("lm_head.weight", lm_head.get("model.embed_tokens.weight"))
    exported = export_vllm(heads, tmp_path / "vllm-heads", base_lm_head_weight=base_w)
    env = {"VLLM_PLUGINS": "none"}
    job = {
        "engine": {
            **ENGINE,
            "speculative_config": {
                "method": "medusa",
                "model": str(exported),
                "num_speculative_tokens": heads.num_heads,
            },
        },
        "prompts": ORACLE_PROMPTS,
        "sampling": {"temperature": 0, "max_tokens": ORACLE_MAX_TOKENS},
    }
    chain = run_engine_job({"model": str(smollm2_dir), **job}, tmp_path, "chain", env=env)
    assert chain["token_ids"] == oracle_plain["token_ids"]
    # vLLM's chain proposer drafts exactly num_heads tokens per step.
    assert chain["spec"]["num_draft_tokens"] == 4 * chain["spec"]["num_drafts"]
    assert chain["spec"]["tau"] > 2.0
