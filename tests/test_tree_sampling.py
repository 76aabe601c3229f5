"""Exact tree rejection sampling and typical acceptance over processed distributions.

Exactness is shown statistically on a model small enough to enumerate: a fixed random "model"
maps the last two tokens to logits over a vocabulary of 5. Many requests decode the same
context; the joint distribution of their first two generated tokens is compared with the
enumerated target (chi-square), for several trees, heads that are always right, always wrong
or random, and a few sampling settings. Deliberately wrong rules, run by a plain-Python
walker that otherwise equals the module sample by sample, fail the same test.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from tests.test_acceptance import _single_thread  # noqa: F401  (autouse: one thread)
from vllm_medusa.core.acceptance import greedy_accept, typical_accept_probs
from vllm_medusa.core.tree import MedusaTree
from vllm_medusa.core.tree_sampling import (
    children_table,
    draw_noise,
    exact_tree_accept,
    target_probs,
)

VOCAB = 5
TREES = {
    "chain": [[0], [0, 0], [0, 0, 0]],
    "wide": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [2, 0]],
    "bushy": [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [0, 0, 0]],
}
SAMPLINGS = {
    "t1": dict(temperature=1.0),
    "t07_k3_p09": dict(temperature=0.7, top_k=3, top_p=0.9),
    "t13_minp": dict(temperature=1.3, min_p=0.1),
}


class ToyModel:
    """Logits of the next token from the last two tokens: a fixed random table."""

    def __init__(self, seed: int = 0, scale: float = 1.5):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(VOCAB, VOCAB, VOCAB, generator=gen) * scale

    def probs(self, prev: torch.Tensor, last: torch.Tensor, sampling: dict) -> torch.Tensor:
        """``[*S]`` token pairs -> processed target probabilities ``[*S, V]``."""
        logits = self.table[prev, last]
        flat = logits.reshape(-1, VOCAB)
        r = flat.shape[0]
        kw = {"temperature": torch.full((r,), sampling["temperature"])}
        if "top_k" in sampling:
            kw["top_k"] = torch.full((r,), sampling["top_k"], dtype=torch.long)
        if "top_p" in sampling:
            kw["top_p"] = torch.full((r,), sampling["top_p"])
        if "min_p" in sampling:
            kw["min_p"] = torch.full((r,), sampling["min_p"])
        return target_probs(flat, **kw).reshape(logits.shape)


def build_tree_step(model, tree, prev, last, sampling, heads, gen):
    """Node tokens ``[S, N+1]`` and target probs ``[S, N+1, V]`` for contexts ending
    ``(prev, last)``. The children of a node take its head's ranking at their rank:
    ``right`` ranks by target probability, ``wrong`` ranks the least likely first,
    ``random`` is a random permutation (drawn apart from the acceptance noise)."""
    buf = tree.buffers()
    parents = buf.parents.tolist()
    s = prev.shape[0]
    n1 = len(parents)
    tokens = torch.zeros(s, n1, dtype=torch.long)
    before = torch.zeros(s, n1, dtype=torch.long)
    tokens[:, 0], before[:, 0] = last, prev
    probs = torch.zeros(s, n1, VOCAB)
    probs[:, 0] = model.probs(prev, last, sampling)
    rankings: dict[int, torch.Tensor] = {}
    for node in range(1, n1):
        p = parents[node]
        if p not in rankings:
            if heads == "right":
                rankings[p] = probs[:, p].argsort(dim=-1, descending=True, stable=True)
            elif heads == "wrong":
                rankings[p] = probs[:, p].argsort(dim=-1, descending=False, stable=True)
            else:
                rankings[p] = torch.rand(s, VOCAB, generator=gen).argsort(dim=-1)
        rank = tree.paths[node - 1][-1]
        tokens[:, node] = rankings[p][:, rank]
        before[:, node] = tokens[:, p]
        probs[:, node] = model.probs(before[:, node], tokens[:, node], sampling)
    return tokens, probs, buf


def generate_two(model, tree, context, sampling, heads, num, seed, accept=None):
    """First two generated tokens ``[num, 2]`` of ``num`` requests decoding ``context``."""
    gen = torch.Generator().manual_seed(seed)
    head_gen = torch.Generator().manual_seed(seed + 1)
    prev = torch.full((num,), context[0])
    last = torch.full((num,), context[1])
    out = torch.full((num, 2), -1, dtype=torch.long)
    filled = torch.zeros(num, dtype=torch.long)
    accepted_total = 0
    while bool((filled < 2).any()):
        tokens, probs, buf = build_tree_step(model, tree, prev, last, sampling, heads, head_gen)
        uniforms, expo = draw_noise(num, tokens.shape[1], VOCAB, default_generator=gen)
        if accept is None:
            res = exact_tree_accept(tokens, probs, buf, uniforms, expo)
        else:
            res = accept(tokens, probs, buf, uniforms, expo)
        accepted_total += int(res.num_accepted[filled == 0].sum())
        emitted = torch.cat([res.accepted_tokens, res.bonus_token[:, None]], dim=1)
        emitted[torch.arange(num), res.num_accepted] = res.bonus_token
        n_emit = res.num_accepted + 1
        for j in range(emitted.shape[1]):
            slot = filled + j
            take = (j < n_emit) & (slot < 2)
            out[take, slot[take]] = emitted[take, j]
        # next context: the last two tokens of what each request has so far
        new_filled = (filled + n_emit).clamp(max=2)
        seq = torch.cat([prev[:, None], last[:, None], out], dim=1)  # [num, 4]
        idx = new_filled + 1
        prev = seq[torch.arange(num), idx - 1]
        last = seq[torch.arange(num), idx]
        filled = new_filled
    return out, accepted_total


def target_joint(model, context, sampling) -> torch.Tensor:
    """``[V, V]`` probability of the first two tokens under plain sampling (float64)."""
    a, b = context
    p1 = model.probs(torch.tensor([a]), torch.tensor([b]), sampling)[0].double()
    p2 = model.probs(torch.full((VOCAB,), b), torch.arange(VOCAB), sampling).double()
    return p1[:, None] * p2


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom (cells with expected < 5 pooled); a
    non-empty cell of zero probability gives an infinite statistic."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = counts.sum()
    if bool((counts[probs <= 0] > 0).any()):
        return math.inf, 1
    expected = probs * n
    small = (expected < 5) & (probs > 0)
    big = expected >= 5
    obs = [counts[big]]
    exp = [expected[big]]
    if bool(small.any()):
        obs.append(counts[small].sum()[None])
        exp.append(expected[small].sum()[None])
    o, e = torch.cat(obs), torch.cat(exp)
    return float(((o - e) ** 2 / e).sum()), o.numel() - 1


def p_value(stat: float, df: int) -> float:
    """Chi-square survival function: the regularized upper incomplete gamma Q(df/2, x/2)."""
    if math.isinf(stat):
        return 0.0
    half = torch.tensor(df / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(half, torch.tensor(stat / 2.0, dtype=torch.float64)))


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return p_value(*chi_square(counts, probs))


def test_chi_square_helper_detects_a_biased_sampler():
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    fair = torch.bincount(torch.multinomial(probs, 20000, True, generator=gen), minlength=3)
    biased = torch.bincount(
        torch.multinomial(torch.tensor([0.52, 0.3, 0.18]), 20000, True, generator=gen),
        minlength=3,
    )
    assert chi_square_p_value(fair, probs) > 1e-3
    assert chi_square_p_value(biased, probs) < 1e-6
    # 20000 draws: the statistic of 2 degrees of freedom, p = exp(-x/2)
    assert math.isclose(
        chi_square_p_value(torch.tensor([10100, 6000, 3900]), probs),
        math.exp(-(100**2 / 10000 + 100**2 / 4000) / 2),
        rel_tol=1e-6,
    )


NUM_SAMPLES = 20000


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
@pytest.mark.parametrize("heads", ["right", "wrong", "random"])
@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_exact_first_two_tokens_match_plain_sampling(tree_name, heads, sampling):
    model = ToyModel(seed=7)
    tree = MedusaTree.from_paths(TREES[tree_name])
    context = (1, 3)
    sp = SAMPLINGS[sampling]
    seed = zlib.crc32(f"{tree_name}/{heads}/{sampling}".encode()) % 10_000
    out, accepted = generate_two(model, tree, context, sp, heads, NUM_SAMPLES, seed)
    counts = torch.bincount(out[:, 0] * VOCAB + out[:, 1], minlength=VOCAB * VOCAB)
    p = chi_square_p_value(counts, target_joint(model, context, sp))
    assert p > 1e-4, (tree_name, heads, sampling, p)
    if heads == "right":
        assert accepted > NUM_SAMPLES // 4  # speculation is really exercised
    if heads == "wrong" and "top_k" in sp and tree.top_k <= VOCAB - sp["top_k"]:
        assert accepted == 0  # the least likely tokens are outside the top-k


# ---- a plain-Python walker: the specification, and deliberately wrong rules ----------------
def walk(tokens, probs, parents, uniforms, expo, rule="exact"):
    """One request. ``rule``: ``exact``; ``no_residual`` (a rejected token stays in the
    distribution the next sibling and the bonus are drawn from); ``no_renormalisation``
    (rejected tokens are removed but the next sibling is accepted with ``r(x)``, the
    unnormalised residual)."""
    kids = {}
    for node, p in enumerate(parents):
        if p >= 0:
            kids.setdefault(p, []).append(node)
    node, r, accepted = 0, list(probs[0]), []
    while True:
        moved = False
        for child in kids.get(node, []):
            x = tokens[child]
            mass = sum(r) if rule != "no_renormalisation" else 1.0
            if uniforms[child] * mass < r[x]:
                node, r, moved = child, list(probs[child]), True
                accepted.append(child)
                break
            if rule != "no_residual":
                r[x] = 0.0
        if not moved:
            break
    weights = [r[v] / expo[v] for v in range(len(r))]
    bonus = max(range(len(r)), key=lambda v: (weights[v], -v))
    return accepted, bonus


def walker_accept(rule):
    def accept(tokens, probs, buf, uniforms, expo):
        parents = buf.parents.tolist()
        b, n1 = tokens.shape
        depth = buf.leaf_paths.shape[1] - 1
        nodes = torch.full((b, depth), -1, dtype=torch.long)
        bonus = torch.zeros(b, dtype=torch.long)
        t, p, u, e = tokens.tolist(), probs.tolist(), uniforms.tolist(), expo.tolist()
        for i in range(b):
            acc, bonus[i] = walk(t[i], p[i], parents, u[i], e[i], rule)
            nodes[i, : len(acc)] = torch.tensor(acc, dtype=torch.long)
        num = (nodes >= 0).sum(1)
        toks = torch.where(nodes >= 0, tokens.gather(1, nodes.clamp(min=0)), -1)
        last = torch.where(num > 0, nodes.gather(1, (num - 1).clamp(min=0)[:, None])[:, 0], 0)
        from vllm_medusa.core.acceptance import AcceptanceResult

        return AcceptanceResult(num, nodes, toks, last, bonus)

    return accept


@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_exact_equals_the_walker_sample_by_sample(tree_name):
    model = ToyModel(seed=3)
    tree = MedusaTree.from_paths(TREES[tree_name])
    gen = torch.Generator().manual_seed(11)
    for heads in ("right", "random"):
        for sp in SAMPLINGS.values():
            s = 400
            prev = torch.randint(0, VOCAB, (s,), generator=gen)
            last = torch.randint(0, VOCAB, (s,), generator=gen)
            tokens, probs, buf = build_tree_step(model, tree, prev, last, sp, heads, gen)
            uniforms, expo = draw_noise(s, tokens.shape[1], VOCAB, default_generator=gen)
            got = exact_tree_accept(tokens, probs, buf, uniforms, expo)
            ref = walker_accept("exact")(tokens, probs, buf, uniforms, expo)
            assert torch.equal(got.accepted_nodes, ref.accepted_nodes)
            assert torch.equal(got.bonus_token, ref.bonus_token)
            assert torch.equal(got.last_node, ref.last_node)
            assert got.output_tokens() == ref.output_tokens()


@pytest.mark.parametrize("rule", ["no_residual", "no_renormalisation"])
def test_wrong_rules_fail_the_chi_square_test(rule):
    model = ToyModel(seed=7)
    tree = MedusaTree.from_paths(TREES["wide"])
    context, sp = (1, 3), SAMPLINGS["t1"]
    joint = target_joint(model, context, sp)
    out, _ = generate_two(
        model, tree, context, sp, "right", NUM_SAMPLES, 5, accept=walker_accept(rule)
    )
    counts = torch.bincount(out[:, 0] * VOCAB + out[:, 1], minlength=VOCAB * VOCAB)
    assert chi_square_p_value(counts, joint) < 1e-8
    # the same walker with the exact rule passes
    out, _ = generate_two(
        model, tree, context, sp, "right", NUM_SAMPLES, 5, accept=walker_accept("exact")
    )
    counts = torch.bincount(out[:, 0] * VOCAB + out[:, 1], minlength=VOCAB * VOCAB)
    assert chi_square_p_value(counts, joint) > 1e-4


def test_exact_respects_present_nodes_and_duplicates():
    # a request that drafted nothing samples p(root); absent nodes are never accepted
    tree = MedusaTree.from_paths(TREES["wide"])
    buf = tree.buffers()
    n1 = tree.num_nodes + 1
    probs = torch.full((3, n1, VOCAB), 1.0 / VOCAB)
    tokens = torch.zeros(3, n1, dtype=torch.long)  # every node: token 0 (duplicate siblings)
    present = torch.zeros(3, n1, dtype=torch.bool)
    present[1, :3] = True  # first two children of the root
    present[2] = True
    uniforms = torch.tensor([[0.0] * n1, [0.5, 0.9, 0.0] + [0.0] * (n1 - 3), [0.9] * n1])
    expo = torch.ones(3, VOCAB)
    expo[:, 4] = 0.01  # the final draw picks token 4 when it has mass
    res = exact_tree_accept(tokens, probs, buf, uniforms, expo, present=present)
    assert res.num_accepted.tolist() == [0, 0, 0]
    # row 1: node 1 (token 0) rejected (0.9 >= 0.2); node 2 also token 0: r(0) = 0 now
    assert res.bonus_token.tolist() == [4, 4, 4]
    assert children_table(buf)[0].tolist()[:3] == [1, 2, 3]


def test_seeded_noise_is_reproducible_and_independent_of_the_batch():
    g = {1: torch.Generator().manual_seed(42)}
    u1, e1 = draw_noise(3, 4, VOCAB, g)
    g = {0: torch.Generator().manual_seed(42)}
    u2, e2 = draw_noise(1, 4, VOCAB, g)
    assert torch.equal(u1[1], u2[0]) and torch.equal(e1[1], e2[0])
    assert not torch.equal(u1[0], u1[1])


# ---- target distribution ------------------------------------------------------------------
def test_target_probs_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 4)
    t = torch.ones(4)
    full = torch.softmax(logits[0], -1)
    p = target_probs(logits, t, top_k=torch.tensor([2, 0, 5, 1]))
    assert torch.allclose(p[0, :2], full[:2] / full[:2].sum()) and p[0, 2:].eq(0).all()
    assert torch.allclose(p[1], full) and torch.allclose(p[2], full)
    assert p[3].tolist() == [1.0, 0, 0, 0, 0]
    # top-p: the smallest top set reaching p
    p = target_probs(logits, t, top_p=torch.tensor([0.5, 0.7, 0.99, 1.0]))
    kept = [int((row > 0).sum()) for row in p]
    cum = full.cumsum(0)
    expect = [int((cum < q).sum()) + 1 for q in (0.5, 0.7, 0.99)] + [5]
    assert kept == expect
    # min-p relative to the most likely token; temperature first
    p = target_probs(logits, torch.tensor([1.0, 2.0, 0.5, 1.0]), min_p=torch.tensor([0.3] * 4))
    for row, temp in zip(p, (1.0, 2.0, 0.5, 1.0), strict=True):
        q = torch.softmax(logits[0] / temp, -1)
        assert torch.equal(row > 0, q >= 0.3 * q.max())
        assert math.isclose(float(row.sum()), 1.0, rel_tol=1e-6)


# ---- typical acceptance over processed distributions ----------------------------------------
def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_typical_probs_formula_per_request():
    tree = MedusaTree.resolve("chain-1")
    buf = tree.buffers()
    row = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0]), -1)
    settings = [(0.09, 0.3), (0.5, 0.3), (0.05, 0.9), (0.2, 0.05), (1e-9, 0.3)]
    for x in range(VOCAB):
        b = len(settings)
        probs = row.expand(b, 2, VOCAB).clone()
        tokens = torch.tensor([[0, x]] * b)
        eps = torch.tensor([s[0] for s in settings])
        delta = torch.tensor([s[1] for s in settings])
        res = typical_accept_probs(tokens, probs, buf, eps, delta, torch.ones(b, VOCAB))
        h = _entropy(row.tolist())
        expect = [int(float(row[x]) > min(e, d * math.exp(-h))) for e, d in settings]
        assert res.num_accepted.tolist() == expect


def test_typical_eps_to_zero_accepts_every_positive_proposal():
    tree = MedusaTree.from_paths(TREES["bushy"])
    buf = tree.buffers()
    gen = torch.Generator().manual_seed(0)
    b, n1 = 64, tree.num_nodes + 1
    logits = torch.randn(b, n1, VOCAB, generator=gen) * 3
    logits[:, :, 4] = float("-inf")  # token 4 never has mass
    probs = torch.softmax(logits, -1)
    tokens = torch.randint(0, VOCAB, (b, n1), generator=gen)
    res = typical_accept_probs(tokens, probs, buf, 1e-30, 0.3, torch.ones(b, VOCAB))
    parents = buf.parents.clamp(min=0)
    positive = probs[:, parents].gather(2, tokens[:, :, None])[:, :, 0] > 0
    # longest path whose every token has positive probability
    paths = buf.leaf_paths
    best = torch.zeros(b, dtype=torch.long)
    for path in paths.tolist():
        nodes = [n for n in path[1:] if n >= 0]
        for i in range(b):
            k = 0
            while k < len(nodes) and bool(positive[i, nodes[k]]):
                k += 1
            best[i] = max(int(best[i]), k)
    assert torch.equal(res.num_accepted, best)
    assert int(best.sum()) > 0 and bool((best < tree.depth).any())


def test_typical_agrees_with_greedy_on_peaked_distributions():
    tree = MedusaTree.from_paths(TREES["wide"])
    buf = tree.buffers()
    gen = torch.Generator().manual_seed(1)
    b, n1 = 128, tree.num_nodes + 1
    peak = torch.randint(0, VOCAB, (b, n1), generator=gen)
    logits = torch.randn(b, n1, VOCAB, generator=gen) * 0.5
    logits += 12.0 * torch.nn.functional.one_hot(peak, VOCAB)
    argmax = logits.argmax(-1)
    parents = buf.parents.clamp(min=0)
    # siblings hold distinct tokens (as top-k drafts do): parent argmax + rank + an offset
    ranks = torch.tensor([0] + [p[-1] for p in tree.paths])
    offset = torch.where(
        torch.rand(b, n1, generator=gen) < 0.6, 0, torch.randint(1, VOCAB, (b, n1), generator=gen)
    )
    tokens = (argmax[:, parents] + ranks + offset[:, parents]) % VOCAB
    probs = target_probs(logits.reshape(-1, VOCAB), torch.ones(b * n1)).reshape(logits.shape)
    expo = torch.empty(b, VOCAB).exponential_(generator=gen)
    res = typical_accept_probs(tokens, probs, buf, 0.09, 0.3, expo)
    ref = greedy_accept(tokens, logits, buf)
    assert res.output_tokens() == ref.output_tokens()
    assert int(ref.num_accepted.sum()) > b // 2
