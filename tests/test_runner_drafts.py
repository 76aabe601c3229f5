"""Only real drafts of requests that may speculate are verified and counted (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm


def _runner(*sampling):
    from vllm import SamplingParams

    from vllm_medusa.integration.options import MedusaTreeOptions

    req_ids = [f"r{i}" for i in range(len(sampling))]
    return SimpleNamespace(
        drafter=SimpleNamespace(options=MedusaTreeOptions()),  # acceptance "greedy"
        input_batch=SimpleNamespace(req_ids=req_ids),
        requests={
            r: SimpleNamespace(sampling_params=SamplingParams(**sp))
            for r, sp in zip(req_ids, sampling, strict=True)
        },
    )


def _spec_md(drafts):
    return SimpleNamespace(
        num_draft_tokens=[len(d) for d in drafts],
        draft_token_ids=torch.tensor(sum(drafts, []), dtype=torch.int32),
    )


GREEDY, SAMPLED = {"temperature": 0}, {"temperature": 0.8}


def test_placeholders_and_ineligible_requests_count_no_drafts():
    from vllm_medusa.integration.runner_patches import real_draft_counts

    runner = _runner(GREEDY, GREEDY, SAMPLED, GREEDY)
    # Real drafts; the scheduler's -1 placeholders; vLLM's zero fallback for a sampled
    # request; no drafts.
    spec_md = _spec_md([[5, 6], [-1, -1], [0, 0], []])
    assert real_draft_counts(runner, spec_md).tolist() == [2, 0, 0, 0]


def test_drafts_of_requests_that_must_not_speculate_are_never_accepted():
    from vllm_medusa.core.tree import MedusaTree
    from vllm_medusa.integration.runner_patches import real_draft_counts, tree_accept_greedy

    tree = MedusaTree.resolve("chain-2", num_heads=2)
    drafter = SimpleNamespace(tree=tree, buffers=tree.buffers())
    runner = _runner(GREEDY, SAMPLED)
    # Both requests drafted [0, 0] (vLLM's zero fallback) and the model's argmax is 0 at every
    # row: greedy accepts both nodes; the sampled request must accept nothing.
    spec_md = _spec_md([[0, 0], [0, 0]])
    logits = torch.zeros(6, 8)
    logits[:, 0] = 1.0
    verify = torch.from_numpy(real_draft_counts(runner, spec_md) > 0)
    num_acc, nodes, _, last, _ = tree_accept_greedy(logits, spec_md, drafter, verify)
    assert num_acc.tolist() == [2, 0]
    assert last.tolist() == [2, 0]
    assert np.array_equal(nodes[1].numpy(), [-1, -1])
