"""Sequential (Hydra-style) heads: tree fill, draft vocabulary, checkpoints, training,
conditional tree calibration. No vLLM, seconds."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_medusa.core.checkpoint import CheckpointError, load_heads
from vllm_medusa.core.sequential_heads import (
    SequentialConfig,
    SequentialHeads,
    SequentialTreePlan,
    draft_vocab_coverage,
    frequent_draft_vocab,
    save_sequential_heads,
)
from vllm_medusa.core.tree import MedusaTree
from vllm_medusa.training.hidden import IGNORE, HiddenCache

TREES = [
    [[0], [1], [2]],
    [[0], [0, 0], [0, 0, 0]],
    [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [1, 0, 2]],
    [[0], [1], [2], [0, 0], [2, 1], [0, 0, 0], [0, 0, 1], [2, 1, 0], [2, 1, 0, 3]],
]


def random_heads(seed=0, h=12, v=40, dv=24, k=4, layers=1) -> tuple[SequentialHeads, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(v, generator=gen)[:dv].sort().values
    heads = SequentialHeads(SequentialConfig(h, v, k, dv, num_layers=layers), ids)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    embed = torch.randn(v, h, generator=gen)
    return heads, embed


def brute_force_fill(heads, tree: MedusaTree, hidden, bonus, embed):
    """Every node's token from its own path, one node at a time."""
    out = torch.empty(hidden.shape[0], tree.num_nodes, dtype=torch.long)
    for b in range(hidden.shape[0]):
        state_of, token_of = {(): None}, {(): int(bonus[b])}
        for j, path in enumerate(tree.paths):
            parent = path[:-1]
            # The parent's state: the head of the parent's depth on the grandparent's state.
            if parent not in state_of or state_of[parent] is None:
                grand = hidden[b] if len(parent) == 0 else state_of[parent[:-1]]
                state_of[parent] = heads.step(len(parent), grand, embed[token_of[parent]])
            logits = heads.draft_logits(state_of[parent])
            rank = path[-1]
            token_of[path] = int(heads.draft_token_ids[logits.topk(rank + 1).indices[rank]])
            out[b, j] = token_of[path]
    return out


@pytest.mark.parametrize("paths", TREES)
def test_depth_by_depth_fill_matches_brute_force(paths):
    heads, embed = random_heads()
    tree = MedusaTree.from_paths(paths)
    plan = SequentialTreePlan.build(tree)
    hidden = torch.randn(5, 12)
    bonus = torch.randint(0, 40, (5,))
    with torch.no_grad():
        got = heads.fill_tree(plan, hidden, bonus, lambda ids: embed[ids])
        want = brute_force_fill(heads, tree, hidden, bonus, embed)
    assert torch.equal(got, want)
    # Every breadth-first prefix is the prefix of the full fill.
    for n in range(tree.num_nodes + 1):
        prefix = heads.fill_tree(plan, hidden, bonus, lambda ids: embed[ids], n)
        assert torch.equal(prefix, want[:, :n])


def test_linear_kernels_serve_every_product_of_the_fill():
    """Drafting through injected linear kernels (a serving engine's prepacked GEMM) gives the
    same tree, and every dense product goes through them."""
    heads, embed = random_heads(seed=5, layers=2)
    tree = MedusaTree.from_paths(TREES[3])
    plan = SequentialTreePlan.build(tree)
    hidden, bonus = torch.randn(6, 12), torch.randint(0, 40, (6,))
    with torch.no_grad():
        want = heads.fill_tree(plan, hidden, bonus, lambda ids: embed[ids])
    calls = {}

    def make_linear(weight, bias):
        weight = weight.clone()  # the kernel owns its copy, like a prepacked one
        bias = None if bias is None else bias.clone()
        key = tuple(weight.shape)

        def linear(x):
            calls[key] = calls.get(key, 0) + 1
            return torch.nn.functional.linear(x, weight, bias)

        return linear

    heads.use_linear_kernels(make_linear)
    with torch.no_grad():
        got = heads.fill_tree(plan, hidden, bonus, lambda ids: embed[ids])
    assert torch.equal(got, want)
    # One call per depth for the input projection, the draft LM head and each block layer.
    depths = len(plan.levels)
    assert calls == {(12, 24): depths, (12, 12): 2 * depths, (24, 12): depths}
    heads.use_linear_kernels(None)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(heads.fill_tree(plan, hidden, bonus, lambda ids: embed[ids]), want)
    assert calls == {}


def test_draft_vocabulary_round_trip_and_only_draft_ids_are_proposed():
    heads, embed = random_heads(seed=3)
    ids = heads.draft_token_ids
    remap = torch.full((40,), -1, dtype=torch.long)
    remap[ids] = torch.arange(ids.numel())
    assert torch.equal(heads.to_full_ids(remap[ids]), ids)  # inside V: exact round trip
    tree = MedusaTree.from_paths(TREES[3])
    tokens = heads.fill_tree(
        SequentialTreePlan.build(tree),
        torch.randn(64, 12),
        torch.randint(0, 40, (64,)),
        lambda x: embed[x],
    )
    outside = torch.ones(40, dtype=torch.bool)
    outside[ids] = False
    assert not outside[tokens].any()  # ids outside V are never proposed


def test_frequent_vocab_and_coverage():
    labels = torch.tensor([[5, 5, 5, 2], [2, 7, IGNORE, 5]])
    assert frequent_draft_vocab(labels, 2, 10).tolist() == [2, 5]
    cov = draft_vocab_coverage(labels, [1, 2, 3], 10)
    assert cov == {1: round(4 / 7, 4), 2: round(6 / 7, 4), 3: 1.0}


def test_checkpoint_round_trip_and_shape_errors(tmp_path):
    heads, _ = random_heads(seed=1)
    folder = save_sequential_heads(heads, tmp_path / "h", tree=[[0], [0, 0]])
    loaded = load_heads(folder, expected_hidden_size=12, expected_vocab_size=40)
    assert isinstance(loaded, SequentialHeads)
    assert loaded.checkpoint_info.tree == [[0], [0, 0]]
    for name, p in heads.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    with pytest.raises(CheckpointError, match="hidden_size 12 but the base model has 16"):
        load_heads(folder, expected_hidden_size=16)
    with pytest.raises(CheckpointError, match="vocab_size 40 but the base model has 41"):
        load_heads(folder, expected_vocab_size=41)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"draft_vocab_size": 23}))
    with pytest.raises(CheckpointError, match="draft_lm_head has shape"):
        load_heads(folder)
    (folder / "config.json").write_text(json.dumps(cfg | {"num_heads": "4"}))
    with pytest.raises(CheckpointError, match="num_heads must be a positive integer"):
        load_heads(folder)


def test_draft_vocabulary_must_be_ascending_and_in_range():
    cfg = SequentialConfig(4, 10, 1, 3)
    with pytest.raises(ValueError, match="strictly ascending"):
        SequentialHeads(cfg, torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        SequentialHeads(cfg, torch.tensor([1, 2, 10]))
    with pytest.raises(ValueError, match="3 ids"):
        SequentialHeads(SequentialConfig(4, 10, 1, 4), torch.tensor([1, 2, 3]))


def synthetic_cache(n_convs=60, length=40, v=16, h=16, seed=0) -> HiddenCache:
    """Text that follows x_{t+1} = x_t + 3 (mod v) from a random start; the "base model"
    always predicts that rule; hidden states are noise (they say nothing about the text).
    Only a head that reads the previous token can predict the next one."""
    gen = torch.Generator().manual_seed(seed)
    tokens, pos, seq_end, conv = [], [], [], []
    for c in range(n_convs):
        start = len(tokens)
        x0 = int(torch.randint(0, v, (1,), generator=gen))
        tokens += [(x0 + 3 * i) % v for i in range(length)]
        pos += list(range(start, start + length - 1))
        seq_end += [start + length] * (length - 1)
        conv += [c] * (length - 1)
    tokens_t = torch.tensor(tokens)
    cache = HiddenCache(
        torch.randn(len(pos), h, generator=gen),
        tokens_t,
        torch.tensor(pos),
        torch.tensor(seq_end),
        torch.tensor(conv),
    )
    cache.next_token = (tokens_t + 3) % v
    return cache


def test_sequential_head_learns_what_only_the_previous_token_tells():
    from vllm_medusa.core.heads import MedusaConfig, MedusaHeads
    from vllm_medusa.training.sequential import (
        SequentialTrainConfig,
        sequential_candidates,
        train_sequential,
    )
    from vllm_medusa.training.train import TrainConfig, train_heads

    torch.manual_seed(0)
    v, h = 16, 16
    train, held = synthetic_cache(n_convs=30, seed=0), synthetic_cache(n_convs=10, seed=1)
    lm_head, embed = torch.randn(v, h), torch.randn(v, h)
    cfg = SequentialTrainConfig(
        num_heads=2, draft_vocab=v, epochs=40, batch_rows=128, lr=2e-2, bf16=False
    )
    seq = train_sequential(train, lm_head, embed, cfg, progress=False).heads
    cand = sequential_candidates(seq, held, embed, max_rank=1, progress=False)
    valid = cand.targets != IGNORE
    seq_acc = ((cand.topk[:, :, 0] == cand.targets) & valid).sum(0) / valid.sum(0)
    assert seq_acc.min() > 0.99, seq_acc

    medusa_cfg = TrainConfig(num_heads=2, epochs=10, batch_tokens=128, lr=2e-2, save_every=0)
    medusa = train_heads(train, lm_head, medusa_cfg, progress=False).heads
    assert isinstance(medusa, MedusaHeads) and isinstance(medusa.config, MedusaConfig)
    top = medusa.topk(held.hidden.float(), 1, lm_head)[:, :, 0]
    targets = held.targets(2)
    ok = targets != IGNORE
    medusa_acc = ((top == targets) & ok).sum(0) / ok.sum(0)
    assert medusa_acc.max() < 0.35, medusa_acc  # chance is 1/16


def test_greedy_path_only_keeps_depths_whose_path_the_model_would_take():
    from vllm_medusa.training.sequential import path_examples

    cache = synthetic_cache(n_convs=2, length=6)
    cache.next_token = cache.next_token.clone()
    cache.next_token[2] = (cache.next_token[2] + 1) % 16  # the model disagrees with token 3
    path, labels = path_examples(cache, 3, greedy_path_only=False)
    _, strict = path_examples(cache, 3, greedy_path_only=True)
    assert torch.equal(path[0], cache.tokens[1:4])
    assert torch.equal(labels[0], cache.next_token[1:4])
    # Row 0: path tokens 1, 2, 3; token 3 is not the model's choice after token 2.
    assert strict[0].tolist() == [int(cache.next_token[1]), int(cache.next_token[2]), IGNORE]
    # The label after a conversation's last token is never used.
    assert labels[4].tolist() == [IGNORE] * 3 and labels[3].tolist()[1:] == [IGNORE] * 2


def test_path_frequency_tree_matches_simulated_acceptance_and_brute_force():
    import itertools

    from vllm_medusa.training.calibrate import grow_tree_from_paths, path_frequencies
    from vllm_medusa.training.evaluate import Candidates, accepted_lengths

    gen = torch.Generator().manual_seed(0)
    n, k, r, v = 400, 2, 3, 4
    topk = torch.stack([torch.randperm(v, generator=gen)[:r] for _ in range(n * k)]).view(n, k, r)
    targets = torch.randint(0, v, (n, k), generator=gen)
    # Make depth 2 depend on depth 1 (not independent): rank-1 at depth 1 -> depth 2 right.
    dep = topk[:, 0, 1] == targets[:, 0]
    targets[dep, 1] = topk[dep, 1, 2]
    cand = Candidates(topk, targets, torch.zeros(n, dtype=torch.long))
    freq = path_frequencies(cand, r)
    universe = [(a,) for a in range(r)] + [(a, b) for a in range(r) for b in range(r)]

    def value(paths):
        return sum(freq.get(tuple(p), 0.0) for p in paths)

    for budget in (1, 2, 3, 4):
        grown = grow_tree_from_paths(freq, budget, fallback=[[0], [1], [2]])
        tree = MedusaTree.from_paths(grown)
        # expected accepted length of the tree = mean simulated acceptance over positions
        assert abs(value(grown) - accepted_lengths(cand, tree).double().mean().item()) < 1e-9
        best = max(
            value(s)
            for s in itertools.combinations(universe, budget)
            if all(len(p) == 1 or p[:-1] in s for p in s)
        )
        assert abs(value(grown) - best) < 1e-9
