"""The cost-aware draft budget: step-cost interpolation, acceptance estimates, node choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vllm_medusa.core.draft_budget import (
    NodeAcceptance,
    StepCostModel,
    VerifyOverhead,
    choose_num_nodes,
)


def test_cost_model_interpolates_and_extrapolates():
    cost = StepCostModel([1, 2, 4, 8], [1.0, 1.0, 2.0, 4.0])
    assert cost(1) == pytest.approx(1.0)
    assert cost(3) == pytest.approx(1.5)
    assert cost(16) == pytest.approx(8.0)  # slope of the last segment: 0.5 s/token
    assert np.allclose(cost([2, 6]), [1.0, 3.0])


def test_cost_model_is_monotone_despite_noise():
    cost = StepCostModel([1, 2, 4], [1.0, 0.9, 2.0])
    assert cost(1) == pytest.approx(0.9) and cost(2) == pytest.approx(0.9)
    # An outlier (noise only adds time) must not make the tokens after it look free: with
    # the outlier at 2 tokens lifted onto 4 and 8, going from 4 to 8 tokens would cost 0.
    cost = StepCostModel([1, 2, 4, 8, 16], [42.2, 50.9, 34.6, 45.0, 61.1])
    assert np.allclose(cost([1, 2, 4, 8, 16]), [34.6, 34.6, 34.6, 45.0, 61.1])
    assert cost(8) - cost(4) == pytest.approx(10.4)


@pytest.mark.parametrize(
    ("tokens", "seconds", "message"),
    [
        ([1], [1.0], "at least two"),
        ([2, 1], [1.0, 2.0], "increase strictly"),
        ([1, 2], [1.0, 0.0], "positive"),
    ],
)
def test_cost_model_rejects_bad_measurements(tokens, seconds, message):
    with pytest.raises(ValueError, match=message):
        StepCostModel(tokens, seconds)


def test_free_verification_drafts_the_whole_tree():
    cost = StepCostModel([1, 1024], [1.0, 1.0])  # flat: any token count costs the same
    assert choose_num_nodes(4, 0, np.full(8, 0.05), cost) == 8


def test_linear_cost_with_weak_heads_decodes_plainly():
    cost = StepCostModel([1, 1024], [1.0, 1024.0])  # compute bound: cost per token
    assert choose_num_nodes(16, 3, np.array([0.5, 0.2, 0.1]), cost) == 0


def test_drafting_cost_can_outweigh_acceptance():
    cost = StepCostModel([1, 1024], [1.0, 1.0])  # verification is free...
    p = np.array([0.2])
    assert choose_num_nodes(1, 0, p, cost, draft_seconds=0.1) == 1
    assert choose_num_nodes(1, 0, p, cost, draft_seconds=0.3) == 0  # ...drafting is not


def test_choice_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        grid = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
        secs = np.cumsum(rng.uniform(0.01, 1.0, len(grid)))
        cost = StepCostModel(grid, secs)
        p = np.sort(rng.uniform(0, 1, rng.integers(1, 10)))[::-1]
        b, o = int(rng.integers(0, 8)), int(rng.integers(0, 8))
        draft = float(rng.uniform(0, 0.5))
        best, best_rate = 0, -1.0
        for n in range(len(p) + 1):
            if b == 0 and n > 0:
                break
            tokens = b * (1 + p[:n].sum()) + o
            rate = tokens / (float(cost(o + b * (1 + n))) + (draft if n else 0.0))
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = n, rate
        assert choose_num_nodes(b, o, p, cost, draft_seconds=draft) == best


def test_max_nodes_caps_the_choice():
    cost = StepCostModel([1, 1024], [1.0, 1.0])
    assert choose_num_nodes(2, 0, np.full(8, 0.5), cost, max_nodes=3) == 3


CHAIN3 = [-1, 0, 1, 2]  # root -> 1 -> 2 -> 3
# root -> {1, 2, 3}; 1 -> {4, 5}; 2 -> {6}; 4 -> {7}
TREE7 = [-1, 0, 0, 0, 1, 1, 2, 4]


def test_acceptance_starts_at_prior_and_learns_along_paths():
    acc = NodeAcceptance(CHAIN3, prior=0.5, prior_weight=4.0, decay=1.0)
    assert np.allclose(acc.probabilities, [0.5, 0.25, 0.125])  # p = q x p_parent
    for _ in range(96):  # node 1 tested every step; 2 only when 1 was accepted, ...
        acc.update(np.array([1.0, 0.5, 0.25]), np.array([0.5, 0.25, 0.0]))
    q = [(2 + 48) / 100, (2 + 24) / 52, 2 / 28]
    assert np.allclose(acc.conditional, q)
    assert np.allclose(acc.probabilities, np.cumprod(q))


def test_default_prior_shares_a_parent_among_its_children():
    acc = NodeAcceptance(TREE7)
    q = acc.conditional
    assert np.allclose(q, [1 / 4, 1 / 4, 1 / 4, 1 / 3, 1 / 3, 1 / 2, 1 / 2])
    p = acc.probabilities
    assert p[3] == pytest.approx(p[0] / 3) and p[6] == pytest.approx(p[3] / 2)


def test_children_never_outscore_their_parent_nor_siblings_their_parent():
    # Rarely tested nodes with an optimistic prior: each alone could claim q = 0.9.
    acc = NodeAcceptance(TREE7, prior=0.9, decay=1.0)
    acc.update(np.array([100.0, 100, 100, 0, 0, 0, 0]), np.array([30.0, 5, 1, 0, 0, 0, 0]))
    p = acc.probabilities
    parents = np.array(TREE7[1:])
    for m in range(1, 8):
        if parents[m - 1] > 0:
            assert p[m - 1] <= p[parents[m - 1] - 1] + 1e-12
    for parent in range(0, 8):
        kids = np.flatnonzero(parents == parent)
        bound = 1.0 if parent == 0 else p[parent - 1]
        assert p[kids].sum() <= bound + 1e-12
    # The expected accepted length of the whole tree stays below its depth.
    assert p.sum() <= 3


def test_observe_step_counts_tests_only_where_the_parent_was_accepted():
    acc = NodeAcceptance(TREE7, prior_weight=1e-9, decay=1.0)
    # Request 0 drafted all 7 and accepted 1 -> 4 -> 7; request 1 drafted 3 nodes, accepted
    # 2; request 2 drafted nothing (must not count); request 3 drafted 5, accepted nothing.
    accepted = acc.observe_step(
        np.array([7, 3, 0, 5]),
        np.array([[1, 4, 7], [2, -1, -1], [-1, -1, -1], [-1, -1, -1]]),
    )
    assert accepted.tolist() == [1, 1, 0, 1, 0, 0, 1]
    assert acc.tested.tolist() == [3, 3, 3, 1, 1, 0, 1]
    assert np.allclose(acc.conditional[:3], [1 / 3, 1 / 3, 0.0], atol=1e-6)


def test_acceptance_decay_follows_recent_traffic():
    acc = NodeAcceptance([-1, 0], prior=0.0, decay=0.9)
    for accepted in itertools.chain([1.0] * 100, [0.0] * 100):
        acc.forget()
        acc.update(np.array([1.0]), np.array([accepted]))
    assert acc.probabilities[0] < 0.01


def test_acceptance_forgets_back_to_the_prior_when_nothing_is_drafted():
    # An engine that stopped drafting re-tests its heads later: observations fade, the
    # optimistic prior stays.
    acc = NodeAcceptance([-1, 0], prior=1.0, prior_weight=4.0, decay=0.99)
    for _ in range(500):
        acc.forget()
        acc.update(np.array([1.0]), np.array([0.0]))
    low = acc.probabilities[0]
    assert low < 0.05
    for _ in range(1000):  # steps without drafts: forget only
        acc.forget()
    assert acc.probabilities[0] > 0.9 > low


def test_acceptance_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        NodeAcceptance(CHAIN3, decay=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NodeAcceptance([-1, 0, 0], prior=[0.5, 1.5])
    with pytest.raises(ValueError, match="prior_weight"):
        NodeAcceptance(CHAIN3, prior_weight=0.0)
    with pytest.raises(ValueError, match="breadth-first"):
        NodeAcceptance([-1, 0, 3, 1])
    with pytest.raises(ValueError, match="at least one node"):
        NodeAcceptance([-1])


def test_per_prefix_draft_seconds():
    cost = StepCostModel([1, 1024], [1.0, 1.0])
    p = np.array([0.5, 0.4, 0.3])
    # Cheap first node, expensive deeper ones: stop after the first.
    assert choose_num_nodes(1, 0, p, cost, draft_seconds=np.array([0.0, 0.1, 5.0, 5.0])) == 1
    assert choose_num_nodes(1, 0, p, cost, draft_seconds=np.zeros(4)) == 3
    # max_nodes truncates the per-prefix costs with the probabilities.
    assert choose_num_nodes(1, 0, p, cost, max_nodes=2, draft_seconds=np.zeros(4)) == 2
    with pytest.raises(ValueError, match="one value per prefix"):
        choose_num_nodes(1, 0, p, cost, draft_seconds=np.zeros(2))


def test_verify_overhead_recovers_a_linear_cost():
    rng = np.random.default_rng(1)
    model = VerifyOverhead(decay=1.0, ridge=1e-6)
    r0, r1, a, c = 0.002, 0.0005, 0.004, 0.0007
    for _ in range(400):
        reqs = int(rng.integers(1, 17))
        verifying = int(rng.integers(0, reqs + 1))
        nodes = int(rng.integers(1, 9))
        residual = r0 + r1 * reqs + a * verifying + c * verifying * nodes
        model.observe(reqs, verifying, verifying * nodes, residual + rng.normal(0, 1e-5))
    assert model.coef == pytest.approx([r0, r1, a, c], abs=2e-5)
    assert model.extra_seconds(4, np.array([0, 2])) == pytest.approx([0.0, 4 * a + 8 * c], abs=2e-4)


def test_verify_overhead_trusts_the_table_until_it_sees_verification():
    model = VerifyOverhead()
    for _ in range(200):  # plain decode steps only: nothing learnt about drafting
        model.observe(8, 0, 0, 0.003)
    assert np.all(model.extra_seconds(8, np.arange(5)) == 0.0)
    # Verification steps that take 10 ms longer than the table make drafting look dearer.
    for _ in range(200):
        model.observe(8, 0, 0, 0.003)
        model.observe(8, 8, 8, 0.013)
    assert model.extra_seconds(8, np.array([1]))[0] == pytest.approx(0.010, rel=0.05)


def test_verify_overhead_is_never_negative_and_fades():
    model = VerifyOverhead(decay=0.9)
    for _ in range(100):
        model.observe(1, 0, 0, 0.005)
        model.observe(1, 1, 1, 0.001)  # faster than plain: noise, not a discount
    assert model.extra_seconds(1, np.array([1]))[0] == 0.0
    slow = VerifyOverhead(decay=0.9)
    for _ in range(100):
        slow.observe(1, 0, 0, 0.001)
        slow.observe(1, 1, 1, 0.011)
    before = slow.extra_seconds(1, np.array([1]))[0]
    for _ in range(100):  # steps without verification: the drafting terms fade to the ridge
        slow.forget()
        slow.observe(1, 0, 0, 0.001)
    assert slow.extra_seconds(1, np.array([1]))[0] < 0.2 * before


@pytest.mark.parametrize("batch", [False, True])
def test_verify_overhead_learns_when_every_step_drafts(batch):
    """Requests, verifying requests and draft tokens move together: 2,000 steps of 10 ms extra
    per verified 4-node draft must be charged to drafting, not to the baseline."""
    rng = np.random.default_rng(2)
    model = VerifyOverhead()
    for _ in range(2000):
        model.forget()
        reqs = int(rng.integers(1, 17)) if batch else 1
        model.observe(reqs, reqs, 4 * reqs, 0.010 * reqs + rng.normal(0, 1e-4))
    assert model.extra_seconds(1, np.array([4]))[0] == pytest.approx(0.010, rel=0.05)
    assert model.extra_seconds(8, np.array([4]))[0] == pytest.approx(0.080, rel=0.05)
    assert model.coef[:2] == pytest.approx([0.0, 0.0], abs=1e-9)  # no plain step seen
