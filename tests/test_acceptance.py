"""Greedy and typical acceptance against brute-force path enumeration.

The references below enumerate every root-to-leaf path of the tree in plain Python (from the
rank paths alone) and walk it node by node. Tie rule, shared with the module: among the
longest accepted paths (typical: and then the highest summed log-probability) the first
root-to-leaf path in leaf order wins, leaves ordered by node index (breadth-first: by depth,
then by rank path).
"""

from __future__ import annotations

import inspect
import math
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vllm_medusa.core.acceptance import (
    TYPICAL_DELTA,
    TYPICAL_EPSILON,
    AcceptanceResult,
    greedy_accept,
    typical_accept,
)
from vllm_medusa.core.tree import MedusaTree


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SETTINGS = settings(
    # fewer examples when test_core_no_vllm re-runs this file in a subprocess
    max_examples=int(os.environ.get("VLLM_MEDUSA_TEST_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---- random trees (independent of the module) ----------------------------------------------
@st.composite
def rank_trees(draw, max_nodes: int = 30, max_depth: int = 5, max_rank: int = 5):
    """Grow a tree by adding children with unused random ranks to random existing nodes."""
    paths: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(1, max_nodes))):
        parent = draw(st.sampled_from([()] + [p for p in paths if len(p) < max_depth]))
        free = [r for r in range(max_rank) if parent + (r,) not in paths]
        if free:
            paths.append(parent + (draw(st.sampled_from(free)),))
    return [list(p) for p in draw(st.permutations(paths))]


def random_tree(rng: random.Random, max_nodes=30, max_depth=5, max_rank=5) -> list[list[int]]:
    paths: list[tuple[int, ...]] = []
    for _ in range(rng.randint(1, max_nodes)):
        parent = rng.choice([()] + [p for p in paths if len(p) < max_depth])
        free = [r for r in range(max_rank) if parent + (r,) not in paths]
        if free:
            paths.append(parent + (rng.choice(free),))
    rng.shuffle(paths)
    return [list(p) for p in paths]


class RefTree:
    """Node numbering, parents and root-to-leaf node sequences, from rank paths."""

    def __init__(self, paths):
        self.nodes = [()] + sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        self.index = {p: i for i, p in enumerate(self.nodes)}
        self.parent = [-1] + [self.index[p[:-1]] for p in self.nodes[1:]]
        children = {p[:-1] for p in self.nodes[1:]}
        leaves = [p for p in self.nodes[1:] if p not in children]
        self.leaf_seqs = [
            [self.index[leaf[:d]] for d in range(1, len(leaf) + 1)] for leaf in leaves
        ]


def first_argmax(row) -> int:
    best = 0
    for i, x in enumerate(row):
        if x > row[best]:
            best = i
    return best


def ref_greedy(ref: RefTree, tokens: list[int], logits: list[list[float]]):
    """Longest root-to-leaf prefix whose tokens are the argmax at their parent."""
    best: list[int] = []
    for seq in ref.leaf_seqs:
        accepted: list[int] = []
        for node in seq:
            if tokens[node] != first_argmax(logits[ref.parent[node]]):
                break
            accepted.append(node)
        if len(accepted) > len(best):
            best = accepted
    last = best[-1] if best else 0
    return best, [tokens[n] for n in best], last, first_argmax(logits[last])


def softmax64(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    m = max(scaled)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in scaled]
    s = sum(e)
    return [x / s for x in e]


def ref_typical(ref, tokens, logits, temperature, eps=0.09, delta=0.3):
    """Typical acceptance in float64. Returns (nodes, tokens, last, margin): ``margin`` is the
    smallest distance of any decision to its boundary (to skip float32-ambiguous cases)."""
    if temperature <= 0:
        nodes, toks, last, _ = ref_greedy(ref, tokens, logits)
        return nodes, toks, last, math.inf
    probs = [softmax64(row, temperature) for row in logits]
    thresholds = []
    for p in probs:
        entropy = -sum(x * math.log(x) for x in p if x > 0)
        thresholds.append(min(eps, delta * math.exp(-entropy)))
    margin = math.inf
    ok = [False] * len(tokens)
    logp = [0.0] * len(tokens)
    for node in range(1, len(tokens)):
        p = probs[ref.parent[node]][tokens[node]]
        thr = thresholds[ref.parent[node]]
        ok[node] = p > thr
        margin = min(margin, abs(p - thr))
        logp[node] = math.log(p) if p > 0 else -math.inf
    best, best_key = [], (0, 0.0)
    keys = []
    for seq in ref.leaf_seqs:
        accepted: list[int] = []
        for node in seq:
            if not ok[node]:
                break
            accepted.append(node)
        key = (len(accepted), sum(logp[n] for n in accepted))
        keys.append((key, tuple(accepted)))
        if key > best_key:
            best, best_key = accepted, key
    # near-ties between different accepted paths are decided by float32 rounding: flag them
    for key, acc in keys:
        if key[0] == best_key[0] and acc != tuple(best):
            diff = abs(key[1] - best_key[1])
            if diff > 0:
                margin = min(margin, diff)
    last = best[-1] if best else 0
    return best, [tokens[n] for n in best], last, margin


def make_case(paths, batch, vocab, p_argmax, seed, scale=2.0):
    """Random logits and node tokens; each node's token is its parent's argmax with
    probability ``p_argmax`` (so that deep paths get accepted), else uniformly random."""
    ref = RefTree(paths)
    n = len(ref.nodes)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n, vocab, generator=gen) * scale
    rng = random.Random(seed)
    tokens = torch.zeros(batch, n, dtype=torch.long)
    for b in range(batch):
        tokens[b, 0] = rng.randrange(vocab)
        for node in range(1, n):
            if rng.random() < p_argmax:
                tokens[b, node] = int(logits[b, ref.parent[node]].argmax())
            else:
                tokens[b, node] = rng.randrange(vocab)
    return ref, tokens, logits


def check_result_shapes(res: AcceptanceResult, batch: int, depth: int) -> None:
    assert res.num_accepted.shape == (batch,)
    assert res.accepted_nodes.shape == (batch, depth)
    assert res.accepted_tokens.shape == (batch, depth)
    assert res.last_node.shape == (batch,)
    assert res.bonus_token.shape == (batch,)


def check_against(res, b, nodes, toks, last, depth):
    n_acc = len(nodes)
    assert int(res.num_accepted[b]) == n_acc
    assert res.accepted_nodes[b].tolist() == nodes + [-1] * (depth - n_acc)
    assert res.accepted_tokens[b].tolist() == toks + [-1] * (depth - n_acc)
    assert int(res.last_node[b]) == last


# ---- greedy ---------------------------------------------------------------------------------
@SETTINGS
@given(
    paths=rank_trees(),
    batch=st.integers(1, 4),
    vocab=st.integers(5, 8),
    p_argmax=st.sampled_from([0.0, 0.3, 0.7, 0.95, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_greedy_matches_brute_force(paths, batch, vocab, p_argmax, seed):
    ref, tokens, logits = make_case(paths, batch, vocab, p_argmax, seed)
    tree = MedusaTree.from_paths(paths)
    res = greedy_accept(tokens, logits, tree.buffers())
    check_result_shapes(res, batch, tree.depth)
    outputs = res.output_tokens()
    for b in range(batch):
        nodes, toks, last, bonus = ref_greedy(ref, tokens[b].tolist(), logits[b].tolist())
        check_against(res, b, nodes, toks, last, tree.depth)
        assert int(res.bonus_token[b]) == bonus
        assert outputs[b] == toks + [bonus]
    if p_argmax == 1.0:  # every node matches: the first deepest leaf path is accepted whole
        assert res.num_accepted.tolist() == [tree.depth] * batch


def test_greedy_chain_partial_and_int32_tokens():
    tree = MedusaTree.resolve("chain-4")
    vocab = 6
    logits = torch.zeros(2, 5, vocab)
    # argmax at node i is token i+1
    for i in range(5):
        logits[:, i, (i + 1) % vocab] = 1.0
    tokens = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 5, 4]], dtype=torch.int32)
    res = greedy_accept(tokens, logits, tree.buffers())
    assert res.num_accepted.tolist() == [4, 2]
    assert res.last_node.tolist() == [4, 2]
    assert res.bonus_token.tolist() == [5, 3]
    assert res.output_tokens() == [[1, 2, 3, 4, 5], [1, 2, 3]]
    res_t = typical_accept(tokens, logits, tree.buffers(), temperature=0.0)
    assert res_t.output_tokens() == [[1, 2, 3, 4, 5], [1, 2, 3]]


def test_greedy_nothing_accepted():
    tree = MedusaTree.from_paths([[0], [1], [0, 0]])
    logits = torch.zeros(1, 4, 5)
    logits[0, :, 3] = 1.0  # argmax 3 everywhere
    tokens = torch.tensor([[7, 0, 1, 2]])
    res = greedy_accept(tokens, logits, tree.buffers())
    assert res.num_accepted.tolist() == [0]
    assert res.last_node.tolist() == [0]
    assert res.accepted_nodes.tolist() == [[-1, -1]]
    assert res.output_tokens() == [[3]]


# ---- greedy is lossless ---------------------------------------------------------------------
class TableModel:
    """A deterministic toy LM: the next token is a function of the last two tokens.
    Logits are one-hot-ish (the chosen token gets +2 over noise in [0, 1))."""

    def __init__(self, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.table = torch.randint(0, vocab, (vocab, vocab), generator=gen)
        self.noise = torch.rand(vocab, vocab, vocab, generator=gen)

    def next_token(self, a: int, b: int) -> int:
        return int(self.table[a, b])

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logits after the token pairs ``(a, b)`` (any shape ``S``) -> ``[*S, V]``."""
        return self.noise[a, b] + 2.0 * torch.nn.functional.one_hot(self.table[a, b], self.vocab)

    def greedy(self, start: list[int], length: int) -> list[int]:
        seq = list(start)
        while len(seq) < length:
            seq.append(self.next_token(seq[-2], seq[-1]))
        return seq


def medusa_decode(model, tree, starts, length, p_correct, rng, accept):
    """Tree speculative decoding of the toy model; heads guess the true continuation at a
    random rank with probability ``p_correct`` and random tokens otherwise."""
    buf = tree.buffers()
    ref = RefTree(tree.to_json())
    num_heads, k = tree.depth, model.vocab
    seqs = [list(s) for s in starts]
    accepted_total = 0
    while min(len(s) for s in seqs) < length:
        batch = len(seqs)
        cands = torch.zeros(batch, num_heads, k, dtype=torch.long)
        for b, seq in enumerate(seqs):
            future = model.greedy(seq, len(seq) + num_heads)[len(seq) :]
            for h in range(num_heads):
                perm = rng.sample(range(model.vocab), model.vocab)
                if rng.random() < p_correct:
                    rank = rng.randrange(tree.top_k)
                    j = perm.index(future[h])
                    perm[j], perm[rank] = perm[rank], perm[j]
                cands[b, h] = torch.tensor(perm)
        filled = buf.fill(cands)
        node_tokens = torch.cat([torch.tensor([[s[-1]] for s in seqs]), filled], dim=1)
        # The context of a node ends with its parent's token and its own; the root's context
        # is the sequence so far.
        before_last = torch.zeros_like(node_tokens)
        for b, seq in enumerate(seqs):
            before_last[b, 0] = seq[-2]
            for node in range(1, len(ref.nodes)):
                before_last[b, node] = node_tokens[b, ref.parent[node]]
        logits = model.logits(before_last, node_tokens)
        res = accept(node_tokens, logits, buf)
        accepted_total += int(res.num_accepted.sum())
        for b, out in enumerate(res.output_tokens()):
            seqs[b].extend(out)
    return [s[:length] for s in seqs], accepted_total


@pytest.mark.parametrize("seed", range(4))
def test_greedy_is_lossless(seed):
    rng = random.Random(seed)
    model = TableModel(vocab=7, seed=seed)
    paths = random_tree(rng, max_nodes=20, max_depth=4, max_rank=4)
    tree = MedusaTree.from_paths(paths)
    starts = [[rng.randrange(7), rng.randrange(7)] for _ in range(3)]
    expected = [model.greedy(s, 32) for s in starts]
    for accept in (
        greedy_accept,
        lambda t, lg, bf: typical_accept(t, lg, bf, temperature=0.0),
        lambda t, lg, bf: typical_accept(t, lg, bf, temperature=torch.zeros(3)),
    ):
        for p_correct in (0.0, 0.6, 1.0):
            got, accepted = medusa_decode(model, tree, starts, 32, p_correct, rng, accept)
            assert got == expected
            if p_correct == 1.0:
                assert accepted > 0


def test_greedy_lossless_chain_all_correct_accepts_everything():
    model = TableModel(vocab=5, seed=11)
    tree = MedusaTree.resolve("chain-3")
    rng = random.Random(0)
    got, accepted = medusa_decode(model, tree, [[1, 2]], 2 + 4 * 5, 1.0, rng, greedy_accept)
    assert got == [model.greedy([1, 2], 22)]
    assert accepted == 3 * 5  # 5 steps of 3 accepted + 1 bonus


# ---- typical acceptance ---------------------------------------------------------------------
def test_typical_defaults():
    assert TYPICAL_EPSILON == 0.09
    assert TYPICAL_DELTA == 0.3
    sig = inspect.signature(typical_accept)
    assert sig.parameters["epsilon"].default == 0.09
    assert sig.parameters["delta"].default == 0.3


@SETTINGS
@given(
    paths=rank_trees(),
    vocab=st.integers(5, 8),
    temps=st.lists(st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.6]), min_size=1, max_size=4),
    p_argmax=st.sampled_from([0.0, 0.5, 0.9]),
    eps_delta=st.sampled_from([(0.09, 0.3), (0.2, 0.5), (0.02, 0.1)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_typical_matches_brute_force(paths, vocab, temps, p_argmax, eps_delta, seed):
    batch = len(temps)
    ref, tokens, logits = make_case(paths, batch, vocab, p_argmax, seed)
    eps, delta = eps_delta
    expected = [
        ref_typical(ref, tokens[b].tolist(), logits[b].tolist(), temps[b], eps, delta)
        for b in range(batch)
    ]
    assume(all(e[3] > 1e-5 for e in expected))
    tree = MedusaTree.from_paths(paths)
    buf = tree.buffers()
    kwargs = {} if eps_delta == (0.09, 0.3) else {"epsilon": eps, "delta": delta}
    gen = torch.Generator().manual_seed(seed)
    res = typical_accept(tokens, logits, buf, torch.tensor(temps), generator=gen, **kwargs)
    check_result_shapes(res, batch, tree.depth)
    greedy = greedy_accept(tokens, logits, buf)
    for b in range(batch):
        nodes, toks, last, _ = expected[b]
        check_against(res, b, nodes, toks, last, tree.depth)
        bonus = int(res.bonus_token[b])
        assert 0 <= bonus < vocab
        if temps[b] == 0.0:  # exactly greedy, bonus included
            for field in ("num_accepted", "accepted_nodes", "accepted_tokens", "last_node"):
                assert getattr(res, field)[b].tolist() == getattr(greedy, field)[b].tolist()
            assert bonus == int(greedy.bonus_token[b])
        else:
            assert softmax64(logits[b, last].tolist(), temps[b])[bonus] > 0


def test_typical_scalar_and_tensor_temperature_agree():
    rng = random.Random(3)
    paths = random_tree(rng)
    ref, tokens, logits = make_case(paths, 4, 6, 0.6, seed=5)
    buf = MedusaTree.from_paths(paths).buffers()
    results = [
        typical_accept(tokens, logits, buf, t, generator=torch.Generator().manual_seed(1))
        for t in (0.8, torch.tensor(0.8), torch.full((4,), 0.8), [0.8] * 4)
    ]
    for r in results[1:]:
        for field in ("num_accepted", "accepted_nodes", "last_node", "bonus_token"):
            assert torch.equal(getattr(r, field), getattr(results[0], field))


def test_typical_prefers_higher_log_probability_on_equal_length():
    # root has two children with different tokens, both acceptable; same length 1
    tree = MedusaTree.from_paths([[0], [1]])
    logits = torch.tensor([[[0.0, 1.0, 1.5, -5.0], [0.0] * 4, [0.0] * 4]])
    for order in ([1, 2], [2, 1]):
        tokens = torch.tensor([[0] + order])
        res = typical_accept(tokens, logits, tree.buffers(), temperature=1.0, epsilon=0.01)
        assert res.num_accepted.tolist() == [1]
        assert res.accepted_tokens[0, 0].item() == 2  # p(2) > p(1)
        assert res.last_node.item() == 1 + order.index(2)


def test_typical_threshold_rule_single_node():
    # p = softmax([2, 1, 0, -1]); the node token is accepted iff p(x) > min(eps, delta e^-H)
    tree = MedusaTree.resolve("chain-1")
    row = [2.0, 1.0, 0.0, -1.0]
    p = softmax64(row, 1.0)
    h = -sum(x * math.log(x) for x in p)
    logits = torch.tensor([[row, [0.0] * 4]] * 4)
    tokens = torch.tensor([[0, x] for x in range(4)])
    for eps, delta in [(0.09, 0.3), (0.5, 0.3), (0.05, 0.9), (0.2, 0.05)]:
        thr = min(eps, delta * math.exp(-h))
        res = typical_accept(tokens, logits, tree.buffers(), 1.0, epsilon=eps, delta=delta)
        assert res.num_accepted.tolist() == [int(px > thr) for px in p]


def _one_hot_case(batch: int):
    """chain-2 where node 1 is accepted, node 2 rejected, and p at node 1 is one-hot on 3."""
    tree = MedusaTree.resolve("chain-2")
    vocab = 5
    logits = torch.zeros(batch, 3, vocab)
    logits[:, 0] = torch.tensor([0.0, 4.0, 0.0, 0.0, 0.0])  # node 1 (token 1) accepted
    logits[:, 1] = torch.full((vocab,), -math.inf)
    logits[:, 1, 3] = 0.0  # one-hot on token 3
    tokens = torch.tensor([[0, 1, 2]] * batch)  # node 2 has token 2: p = 0, rejected
    return tree, tokens, logits


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_typical_bonus_one_hot(temperature):
    tree, tokens, logits = _one_hot_case(64)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        res = typical_accept(tokens, logits, tree.buffers(), temperature, generator=gen)
        assert res.num_accepted.tolist() == [1] * 64
        assert res.last_node.tolist() == [1] * 64
        assert res.bonus_token.tolist() == [3] * 64
        assert res.output_tokens() == [[1, 3]] * 64


def test_typical_bonus_distribution():
    """The bonus is drawn from p at the last accepted node (frequencies within tolerance)."""
    tree = MedusaTree.resolve("chain-1")
    vocab, half, temperature = 5, 10000, 0.8
    root = torch.tensor([0.5, 2.0, -1.0, 0.0, 1.0])
    node = torch.tensor([1.0, -0.5, 0.3, 1.2, -2.0])
    logits = torch.stack([root, node]).expand(2 * half, 2, vocab).clone()
    tokens = torch.zeros(2 * half, 2, dtype=torch.long)
    tokens[:half, 1] = 1  # root argmax: accepted -> bonus from node 1
    tokens[half:, 1] = 2  # p(2) at root ~ 0.03, below threshold -> bonus from the root
    gen = torch.Generator().manual_seed(1234)
    res = typical_accept(tokens, logits, tree.buffers(), temperature, generator=gen)
    assert res.last_node[:half].eq(1).all() and res.last_node[half:].eq(0).all()
    for rows, row_logits in ((slice(0, half), node), (slice(half, None), root)):
        p = softmax64(row_logits.tolist(), temperature)
        counts = torch.bincount(res.bonus_token[rows], minlength=vocab).double() / half
        for v in range(vocab):
            sigma = math.sqrt(p[v] * (1 - p[v]) / half)
            assert abs(float(counts[v]) - p[v]) < 5 * sigma + 1e-3, (v, counts.tolist(), p)
    # same generator seed: same draws
    again = typical_accept(
        tokens, logits, tree.buffers(), temperature, generator=torch.Generator().manual_seed(1234)
    )
    assert torch.equal(again.bonus_token, res.bonus_token)


# ---- shape errors ---------------------------------------------------------------------------
def test_shape_errors():
    buf = MedusaTree.from_paths([[0], [1], [0, 0]]).buffers()  # 4 nodes with the root
    tokens = torch.zeros(2, 4, dtype=torch.long)
    logits = torch.zeros(2, 4, 6)
    greedy_accept(tokens, logits, buf)
    typical_accept(tokens, logits, buf, 1.0)
    bad = [
        (torch.zeros(4, dtype=torch.long), logits, "node_tokens must be"),
        (torch.zeros(2, 3, dtype=torch.long), logits, r"node_tokens must be \[B, 4\]"),
        (tokens, torch.zeros(2, 4), "logits must be"),
        (tokens, torch.zeros(3, 4, 6), r"logits must be \[B, 4, V\]"),
        (tokens, torch.zeros(2, 5, 6), "logits must be"),
    ]
    for t, lg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            greedy_accept(t, lg, buf)
        with pytest.raises(ValueError, match=msg):
            typical_accept(t, lg, buf, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        typical_accept(tokens, logits, buf, torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        typical_accept(tokens, logits, buf, torch.ones(2, 1))
