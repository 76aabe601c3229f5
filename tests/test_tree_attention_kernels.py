"""Tree attention rows and KV compaction on a paged CPU cache, against brute force (no engine).

The plan (which rows to fix, what each may see), the compiled kernels and the pure-PyTorch
reference are each checked against a direct construction from the tree's ancestor sets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm

SHIPPED_TREE = [
    [0], [1], [2], [3], [4], [5], [0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [2, 0],
    [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0],
]  # fmt: skip


def _tree(paths=SHIPPED_TREE):
    from vllm_medusa.core.tree import MedusaTree

    return MedusaTree.from_paths(paths, num_heads=4)


def _visible_nodes(tree, node: int) -> set[int]:
    """Root, ancestors and the node itself, from the parent list alone."""
    parents = tree.parents  # node 0 is the root (parent -1)
    seen = {node}
    while node > 0:
        node = parents[node]
        seen.add(node)
    return seen


def _page_k(kv, block, head, t):
    nb, h, bs, d2 = kv.shape
    return kv.view(nb, h, 2, bs * (d2 // 2))[block, head, 0].view(d2 // 2, bs)[:, t]


def _page_v(kv, block, head, t):
    nb, h, bs, d2 = kv.shape
    return kv.view(nb, h, 2, bs * (d2 // 2))[block, head, 1].view(bs, d2 // 2)[t]


class Batch:
    """Requests with trees of mixed sizes (0 included) on a shuffled paged cache."""

    def __init__(self, num_draft, root_pos, block_size=16, kv_heads=3, heads=9, head_size=8):
        gen = torch.Generator().manual_seed(0)
        self.tree = _tree()
        self.num_draft = np.asarray(num_draft, dtype=np.int64)
        self.root_pos = np.asarray(root_pos, dtype=np.int64)
        q_lens = self.num_draft + 1
        self.root_rows = np.cumsum(q_lens) - q_lens
        pages = (self.root_pos + self.num_draft) // block_size + 1
        num_blocks = int(pages.sum()) + 4
        perm = torch.randperm(num_blocks, generator=gen).numpy()
        self.block_table = np.zeros((len(num_draft), int(pages.max()) + 2), dtype=np.int32)
        used = 0
        for i, p in enumerate(pages):
            self.block_table[i, :p] = perm[used : used + p]
            used += p
        self.block_size = block_size
        self.kv = torch.randn(num_blocks, kv_heads, block_size, 2 * head_size, generator=gen)
        self.query = torch.randn(int(q_lens.sum()), heads, head_size, generator=gen)
        self.heads, self.kv_heads, self.head_size = heads, kv_heads, head_size

    def layout(self):
        from vllm_medusa.integration.tree_attention import TreeMaskLayout

        return TreeMaskLayout(self.tree.buffers().ancestor_mask.numpy())

    def plan(self):
        return self.layout().plan(
            self.root_rows,
            self.root_pos,
            self.num_draft,
            self.block_table,
            self.block_size,
            "cpu",
        )

    def brute_force(self, row: int) -> tuple[int, int, torch.Tensor]:
        """(request, node, attention output [H * D]) of one tree row."""
        i = int(np.searchsorted(self.root_rows, row, side="right")) - 1
        node = row - int(self.root_rows[i])
        ctx = int(self.root_pos[i])
        positions = list(range(ctx)) + [ctx + m for m in sorted(_visible_nodes(self.tree, node))]
        group = self.heads // self.kv_heads
        out = []
        for h in range(self.heads):
            g = h // group
            ks, vs = [], []
            for p in positions:
                block = int(self.block_table[i, p // self.block_size])
                ks.append(_page_k(self.kv, block, g, p % self.block_size))
                vs.append(_page_v(self.kv, block, g, p % self.block_size))
            scores = torch.stack(ks) @ self.query[row, h] * self.scale
            out.append(torch.softmax(scores, 0) @ torch.stack(vs))
        return i, node, torch.cat(out)

    @property
    def scale(self) -> float:
        return self.head_size**-0.5


def _expected_fixed_rows(batch) -> list[int]:
    rows = []
    for i, n in enumerate(batch.num_draft):
        for node in range(1, int(n) + 1):
            if _visible_nodes(batch.tree, node) != set(range(node + 1)):
                rows.append(int(batch.root_rows[i]) + node)
    return rows


BATCHES = {
    "mixed": ([16, 0, 5, 1, 9], [130, 7, 47, 15, 0]),
    "one": ([16], [200]),
    "none_to_fix": ([1, 0], [20, 31]),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_plan_fixes_exactly_the_rows_the_causal_kernel_gets_wrong(name):
    batch = Batch(*BATCHES[name])
    plan = batch.plan()
    expected = _expected_fixed_rows(batch)
    if not expected:
        assert plan is None
        return
    assert plan.rows.tolist() == expected
    # request_rows: one run of consecutive rows per request that has rows to fix
    runs = np.split(np.asarray(expected), plan.request_rows[1:-1].tolist())
    owners = [
        {int(np.searchsorted(batch.root_rows, r, side="right")) - 1 for r in run} for run in runs
    ]
    assert all(len(o) == 1 for o in owners) and len({o.pop() for o in owners}) == len(runs)
    assert int(plan.request_rows[0]) == 0 and int(plan.request_rows[-1]) == len(expected)
    for f, row in enumerate(expected):
        i, node, _ = batch.brute_force(row)
        ctx = int(batch.root_pos[i])
        assert int(plan.prefix_len[f]) == ctx
        keys = {int(k) for k in plan.tree_keys[f] if k >= 0}
        assert keys == {ctx + m for m in _visible_nodes(batch.tree, node)}
        used = (ctx + int(batch.num_draft[i])) // batch.block_size + 1
        assert plan.blocks[f, :used].tolist() == batch.block_table[i, :used].tolist()


# (block_size, head_size): padded tiles (head 8, block 16, fp32 pages copied into a padded
# buffer) and fp32 pages read in place (both multiples of 16 lanes).
SHAPES = {"padded": (16, 8), "in_place": (32, 16)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["compiled", "torch"])
def test_fixed_rows_match_brute_force_attention_and_others_stay(mode, shape, monkeypatch):
    from vllm_medusa.integration import tree_kernels
    from vllm_medusa.integration.tree_attention import recompute_tree_rows

    monkeypatch.setenv(tree_kernels.KERNELS_ENV, mode)
    block_size, head_size = SHAPES[shape]
    batch = Batch(*BATCHES["mixed"], block_size=block_size, head_size=head_size)
    plan = batch.plan()
    sentinel = torch.full((batch.query.shape[0], batch.heads * batch.head_size), 7.0)
    out = sentinel.clone()
    recompute_tree_rows(plan, batch.query, batch.kv, out, batch.heads, batch.scale)
    fixed = set(plan.rows.tolist())
    for row in range(out.shape[0]):
        if row in fixed:
            torch.testing.assert_close(out[row], batch.brute_force(row)[2], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(out[row], sentinel[row])


def test_compiled_rows_accept_a_strided_query_and_bfloat16(monkeypatch):
    """vLLM hands attention a query sliced out of the fused QKV projection (row stride > H*D)."""
    from vllm_medusa.integration import tree_kernels
    from vllm_medusa.integration.tree_attention import recompute_tree_rows, tree_rows_reference

    monkeypatch.setenv(tree_kernels.KERNELS_ENV, "compiled")

    batch = Batch(*BATCHES["mixed"])
    plan = batch.plan()
    qkv = torch.randn(batch.query.shape[0], batch.heads * batch.head_size + 48)
    query = qkv[:, : batch.heads * batch.head_size].view(-1, batch.heads, batch.head_size)
    ref = tree_rows_reference(plan, query, batch.kv, batch.heads, batch.scale)
    out = torch.zeros(query.shape[0], batch.heads * batch.head_size)
    recompute_tree_rows(plan, query, batch.kv, out, batch.heads, batch.scale)
    torch.testing.assert_close(out[plan.rows], ref, rtol=1e-5, atol=1e-5)
    out16 = out.to(torch.bfloat16)
    recompute_tree_rows(
        plan, query.to(torch.bfloat16), batch.kv.to(torch.bfloat16), out16, batch.heads, batch.scale
    )
    torch.testing.assert_close(out16[plan.rows].float(), ref, rtol=0.05, atol=0.05)


def test_compaction_moves_accepted_nodes_to_consecutive_slots():
    """Accepted path nodes 3, 7, 12 (depths 1-3) after a root at slot 40 move to 41-43, in every
    layer's cache, as "read every source, then write" would."""
    from vllm_medusa.integration import tree_kernels
    from vllm_medusa.integration.tree_attention import read_kv

    gen = torch.Generator().manual_seed(1)
    caches = [torch.randn(6, 3, 16, 16, generator=gen) for _ in range(2)]
    root = 40
    src = torch.tensor([root + 3, root + 7, root + 12, 5 * 16 + 9])
    dst = torch.tensor([root + 1, root + 2, root + 3, 5 * 16 + 2])  # a second request too
    expected = []
    for kv in caches:
        k, v = read_kv(kv, src)
        expected.append((k.clone(), v.clone(), read_kv(kv, torch.tensor([0, 63]))))
    tree_kernels.compiled().copy_kv_slots(caches, src, dst)
    for kv, (k, v, (k_other, v_other)) in zip(caches, expected, strict=True):
        k_now, v_now = read_kv(kv, dst)
        assert torch.equal(k_now, k) and torch.equal(v_now, v)
        k_keep, v_keep = read_kv(kv, torch.tensor([0, 63]))  # untouched slots stay
        assert torch.equal(k_keep, k_other) and torch.equal(v_keep, v_other)


def test_compiled_argmax_is_torchs_first_maximum():
    """Greedy acceptance must pick exactly the token vLLM's greedy sampler picks: ties go to the
    first index; vocabularies that are not whole vectors; rows with a stride."""
    from vllm_medusa.integration import tree_kernels

    gen = torch.Generator().manual_seed(2)
    for vocab in (1, 15, 16, 17, 100, 49152):
        logits = torch.randn(6, vocab + 3, generator=gen)[:, :vocab]  # row stride > vocab
        logits[1] = 0.0  # all tied
        logits[2, vocab // 2 :] = 50.0  # a tie between the middle and the end
        logits[3] = float("-inf")
        logits[4, -1] = 60.0  # the last index
        assert torch.equal(tree_kernels.compiled().argmax_rows(logits), logits.argmax(-1)), vocab
