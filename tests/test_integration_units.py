"""Integration pieces without an engine: the step's tree plan, K/V access in vLLM's CPU pages,
greedy tree acceptance over a batch, and the start-up K/V packing check.

Each is compared with a brute-force reference built from the tree's paths alone (ancestors
are path prefixes, positions are path lengths), not from the implementation's buffers, so the
tests hold for any rewrite that keeps the public interface: ``build_tree_plan`` returns a
:class:`TreeAttentionPlan` whose masked rows (with vLLM's index-causal kernel for the others)
give every node exactly its prefix, ancestors and itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm

# Breadth-first; node m (1-based) is PATHS[m - 1]. Branches at depths 1 and 2.
PATHS = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]]


def _tree():
    from vllm_medusa.core.tree import MedusaTree

    tree = MedusaTree.from_paths(PATHS, num_heads=3)
    assert [list(p) for p in tree.paths] == PATHS
    return tree


def _ancestors_or_self(m: int) -> set[int]:
    """Brute force: nodes (0 = root) whose path is a prefix of node m's path."""
    if m == 0:
        return {0}
    path = PATHS[m - 1]
    return {0} | {a + 1 for a, p in enumerate(PATHS) if path[: len(p)] == p}


def _needs_tree_mask(m: int) -> bool:
    """vLLM's kernel lets node m see tree slots 0..m: right only if those are its ancestors."""
    return _ancestors_or_self(m) != set(range(m + 1))


def _drafter(tree):
    from vllm_medusa.integration.tree_attention import TreeMaskLayout

    """A stand-in for the proposer's tree view (rows to fix from the brute force)."""
    buffers = tree.buffers()
    return SimpleNamespace(
        tree=tree,
        buffers=buffers,
        node_depths_np=np.asarray(tree.depths, dtype=np.int64),
        mask_layout=TreeMaskLayout(buffers.ancestor_mask.numpy()),
    )


BLOCK_SIZE = 16


def _step(requests):
    """A stand-in runner for one step. ``requests``: (computed tokens, scheduled tokens,
    drafts) per request in batch order; the last ``drafts`` scheduled tokens are drafts."""
    rng = np.random.default_rng(0)
    num_computed = np.array([c for c, _, _ in requests], dtype=np.int32)
    scheduled = np.array([s for _, s, _ in requests], dtype=np.int32)
    drafts = [d for _, _, d in requests]
    max_blocks = 16
    # Each request owns distinct, shuffled blocks (paged: position order != block id order).
    block_ids = rng.permutation(len(requests) * max_blocks).reshape(len(requests), max_blocks)
    query_start = np.concatenate([[0], np.cumsum(scheduled)]).astype(np.int32)
    # What vLLM's _prepare_inputs leaves: positions computed + index in the query.
    positions = torch.from_numpy(
        np.concatenate([c + np.arange(s) for c, s, _ in requests]).astype(np.int64)
    )
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(
            num_reqs=len(requests),
            num_computed_tokens_cpu=num_computed,
            block_table=[
                SimpleNamespace(block_size=BLOCK_SIZE, block_table=SimpleNamespace(np=block_ids))
            ],
        ),
        query_start_loc=SimpleNamespace(np=np.concatenate([query_start, [0, 0]])),
        positions=positions.clone(),
        device=torch.device("cpu"),
    )
    spec_md = SimpleNamespace(num_draft_tokens=drafts)
    return runner, spec_md, scheduled, positions, query_start


def _check_plan(requests):
    from vllm_medusa.integration.runner_patches import build_tree_plan

    tree = _tree()
    runner, spec_md, scheduled, before, query_start = _step(requests)
    plan = build_tree_plan(runner, _drafter(tree), spec_md, scheduled)
    block_ids = runner.input_batch.block_table[0].block_table.np

    # Positions: tree node m sits at root position + its depth; every other row is untouched.
    want = before.clone()
    needed = set()  # global rows the kernel gets wrong
    for i, (computed, sched, n) in enumerate(requests):
        root_row = query_start[i + 1] - 1 - n
        root_pos = computed + sched - 1 - n
        for m in range(1, n + 1):
            want[root_row + m] = root_pos + len(PATHS[m - 1])
            if _needs_tree_mask(m):
                needed.add(int(root_row + m))
    assert torch.equal(runner.positions, want)

    if plan is None:
        assert not needed
        return None
    fixed = set()
    for f, row in enumerate(plan.rows.tolist()):
        i = int(np.searchsorted(query_start, row, side="right")) - 1
        computed, sched, n = requests[i]
        root_row, root_pos = query_start[i + 1] - 1 - n, computed + sched - 1 - n
        m = row - root_row
        assert 0 <= m <= n, (row, i)
        # Each key the plan lets this row see, as a position of its own request, and the
        # pages it reads them from: the request's own blocks in position order.
        seen = set(range(int(plan.prefix_len[f]))) | {int(k) for k in plan.tree_keys[f] if k >= 0}
        visible = set(range(root_pos)) | {root_pos + a for a in _ancestors_or_self(m)}
        assert seen == visible, (i, m)
        pages = max(seen) // BLOCK_SIZE + 1
        assert plan.blocks[f, :pages].tolist() == block_ids[i, :pages].tolist()
        fixed.add(row)
    assert needed <= fixed, sorted(needed - fixed)
    _check_trimmed_kernel_rows(requests, query_start, plan)
    return plan


def _check_trimmed_kernel_rows(requests, query_start, plan) -> None:
    """vLLM's kernel keeps exactly the rows outside the plan, each with the causal limit it
    had in the whole query (so its output is unchanged by the trimming)."""
    from vllm_medusa.integration.tree_attention import trimmed_lengths

    seq_lens = np.array([c + s for c, s, _ in requests], dtype=np.int64)
    kept, start_loc, new_seq_lens = trimmed_lengths(
        query_start.astype(np.int64), seq_lens, plan.rows_per_request
    )
    planned = set(plan.rows.tolist())
    assert sorted(set(kept.tolist()) | planned) == list(range(int(query_start[-1])))
    assert not set(kept.tolist()) & planned
    for i in range(len(requests)):
        rows = kept[start_loc[i] : start_loc[i + 1]]
        assert rows.tolist() == list(range(query_start[i], query_start[i] + len(rows)))
        # Query row j's last visible key, seq_len - q_len + j, is the same before and after.
        q_len = query_start[i + 1] - query_start[i]
        assert seq_lens[i] - q_len == new_seq_lens[i] - len(rows)


def test_tree_plan_for_mixed_draft_counts():
    # Full tree across a page boundary; a prefill chunk; a plain decode (0 drafts); partial
    # trees; a request with only exact rows (the first child and a chain below it).
    requests = [(37, 11, 10), (0, 20, 0), (5, 1, 0), (70, 6, 5), (15, 3, 2), (9, 9, 8)]
    plan = _check_plan(requests)
    assert plan is not None


def test_tree_plan_without_rows_to_fix():
    # No drafts at all, and drafts that the index-causal kernel already gets right.
    assert _check_plan([(3, 1, 0), (0, 12, 0)]) is None
    assert _check_plan([(4, 2, 1), (0, 12, 0), (30, 1, 0)]) is None


def test_tree_plan_for_random_batches():
    rng = np.random.default_rng(1)
    for _ in range(20):
        requests = []
        for _ in range(int(rng.integers(1, 6))):
            n = int(rng.integers(0, len(PATHS) + 1))
            computed = int(rng.integers(0, 200))
            prefill = n == 0 and rng.random() < 0.5
            requests.append((computed, int(rng.integers(2, 30)) if prefill else 1 + n, n))
        _check_plan(requests)


# ---- greedy tree acceptance ------------------------------------------------------------------


def _accept_brute_force(logits_rows, tokens, n):
    """Walk from the root: the child whose token is the argmax at its parent's row."""
    node, path = 0, []
    while True:
        target = int(logits_rows[node].argmax())
        children = [
            m for m in range(1, n + 1) if len(PATHS[m - 1]) == len(path) + 1
            and (node == 0 or PATHS[m - 1][:-1] == PATHS[node - 1])
        ]  # fmt: skip
        match = [m for m in children if tokens[m - 1] == target]
        if not match:
            return path
        node = match[0]
        path.append(node)


def test_greedy_tree_acceptance_matches_brute_force():
    from vllm_medusa.integration.runner_patches import tree_accept_greedy

    tree = _tree()
    drafter = _drafter(tree)
    rng = np.random.default_rng(2)
    vocab = 12
    for trial in range(30):
        counts = [int(c) for c in rng.integers(0, len(PATHS) + 1, size=int(rng.integers(1, 6)))]
        logits = torch.from_numpy(rng.standard_normal((sum(c + 1 for c in counts), vocab)))
        drafts, expected, row = [], [], 0
        for n in counts:
            rows = logits[row : row + n + 1]
            tokens = []
            for m in range(1, n + 1):
                parent = 0 if len(PATHS[m - 1]) == 1 else PATHS.index(PATHS[m - 1][:-1]) + 1
                target = int(rows[parent].argmax())
                siblings = {
                    tokens[k - 1] for k in range(1, m) if PATHS[k - 1][:-1] == PATHS[m - 1][:-1]
                }
                # Often the target (deep acceptance); siblings stay distinct, as top-k ranks.
                if target not in siblings and rng.random() < 0.7:
                    tokens.append(target)
                else:
                    tokens.append(int(rng.choice(sorted(set(range(vocab)) - siblings))))
            drafts.append(tokens)
            expected.append(_accept_brute_force(rows, tokens, n))
            row += n + 1
        spec_md = SimpleNamespace(
            num_draft_tokens=counts,
            draft_token_ids=torch.tensor(sum(drafts, []), dtype=torch.int32),
        )
        verify = torch.from_numpy(rng.random(len(counts)) < 0.8)
        num_acc, nodes, acc_tokens, last, first_row = tree_accept_greedy(
            logits, spec_md, drafter, verify
        )
        first = np.cumsum([0] + [c + 1 for c in counts])[:-1]
        assert first_row.tolist() == first.tolist()
        for b, path in enumerate(expected):
            path = path if bool(verify[b]) else []
            k = len(path)
            assert num_acc[b] == k, (trial, b)
            assert nodes[b, :k].tolist() == path and (nodes[b, k:] == -1).all()
            assert acc_tokens[b, :k].tolist() == [drafts[b][m - 1] for m in path]
            assert last[b] == (path[-1] if path else 0)


# ---- K/V in vLLM's CPU pages -----------------------------------------------------------------


def _vllm_write(kv_cache, key, value, slots, isa):
    """K/V written exactly as vLLM's CPU attention backend writes them (its own view)."""
    from vllm import _custom_ops as ops

    nb, h, bs, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view((nb, h, bs * 2, -1)).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def _layer(isa):
    return SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0, kv_cache_dtype="auto")


def _engine_isa(block_size, head_size):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.float32, block_size, head_size)


@pytest.mark.parametrize(
    ("isa", "block_size", "head_size"),
    [("vec", 32, 64), ("vec16", 16, 48), ("engine", 16, 64), ("engine", 32, 64)],
)
def test_kv_read_write_match_vllms_cache_writer(isa, block_size, head_size):
    from vllm_medusa.integration.tree_attention import read_kv, write_kv

    if isa == "engine":  # what this machine's engine picks for an fp32 model
        isa = _engine_isa(block_size, head_size)
    torch.manual_seed(0)
    nb, h = 5, 3
    slots = torch.tensor(
        [0, 1, block_size - 1, block_size + 2, 3 * block_size + 5, 5 * block_size - 1]
    )
    key, value = torch.randn(len(slots), h, head_size), torch.randn(len(slots), h, head_size)
    by_vllm = torch.zeros(nb, h, block_size, 2 * head_size)
    _vllm_write(by_vllm, key, value, slots, isa)
    # read_kv returns what vLLM wrote.
    k_back, v_back = read_kv(by_vllm, slots)
    assert torch.equal(k_back, key) and torch.equal(v_back, value)
    # write_kv leaves the cache exactly as vLLM's writer does (no other slot touched).
    ours = torch.zeros_like(by_vllm)
    write_kv(_layer(isa), ours, key, value, slots)
    assert torch.equal(ours, by_vllm)
    # Moving K/V between slots (the KV compaction): reading after writing elsewhere.
    dst = torch.tensor([2, 7, block_size, 2 * block_size, 4 * block_size, 4 * block_size + 1])
    write_kv(_layer(isa), ours, *read_kv(ours, slots), dst)
    _vllm_write(by_vllm, key, value, dst, isa)
    assert torch.equal(ours, by_vllm)


# ---- the K/V packing check at engine start ---------------------------------------------------


def _runner_with_layer(layer, kv_cache):
    layer.kv_cache = [kv_cache]
    layer.impl = SimpleNamespace(
        sliding_window=-1, logits_soft_cap=0, sinks=None, alibi_slopes=None
    )
    return SimpleNamespace(
        compilation_config=SimpleNamespace(static_forward_context={"layers.0.attn": layer}),
        kv_cache_config=SimpleNamespace(kv_cache_groups=[object()]),
    )


def test_start_up_check_passes_for_this_machines_packing(monkeypatch):
    from vllm_medusa.integration import startup_checks, tree_attention

    monkeypatch.setattr(tree_attention, "_LAYOUT_CHECKED", set())
    isa = _engine_isa(16, 64)
    runner = _runner_with_layer(_layer(isa), torch.zeros(4, 2, 16, 128))
    assert startup_checks.check_model(runner) == [isa]
    assert isa in tree_attention._LAYOUT_CHECKED  # the first tree step does not re-check


def test_start_up_check_refuses_an_unknown_packing(monkeypatch):
    """A writer that stores K row-major (as V) instead of column-major must fail at start."""
    from vllm_medusa.integration import startup_checks, tree_attention
    from vllm_medusa.integration.options import MedusaConfigError

    def row_major_writer(key, value, key_cache, value_cache, slots, isa, **kwargs):
        bs = key_cache.shape[2]
        for s, k, v in zip(slots.tolist(), key, value, strict=True):
            key_cache[s // bs, :, s % bs] = k  # [H, D] into row s % bs of the K page
            value_cache[s // bs, :, s % bs] = v

    monkeypatch.setattr(tree_attention, "_LAYOUT_CHECKED", set())
    monkeypatch.setattr(
        tree_attention, "ops", SimpleNamespace(cpu_attn_reshape_and_cache=row_major_writer)
    )
    runner = _runner_with_layer(_layer("made-up-isa"), torch.zeros(4, 2, 16, 128))
    with pytest.raises(tree_attention.KVCacheLayoutError, match="ISA 'made-up-isa'") as info:
        startup_checks.check_model(runner)
    assert isinstance(info.value, MedusaConfigError)
    assert "made-up-isa" not in tree_attention._LAYOUT_CHECKED


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_prepacked_draft_gemm_matches_f_linear(rows):
    """vLLM's oneDNN GEMM that drafting runs on a CPU: the products of ``F.linear`` (to fp32
    rounding), for 2-D and 3-D inputs, non-contiguous ones and with or without bias."""
    from vllm_medusa.integration.draft_gemm import prepacked_linear_factory

    make = prepacked_linear_factory(torch.device("cpu"))
    assert make is not None, "this vLLM build has no oneDNN GEMM for drafting"
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(rows, 2, 64, generator=gen).transpose(0, 1)  # [2, rows, 64], strided
    for b in (bias, None):
        linear = make(weight, b)
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, weight, b))
        torch.testing.assert_close(linear(x[0]), torch.nn.functional.linear(x[0], weight, b))


def test_draft_gemm_switch(monkeypatch):
    from vllm_medusa.integration.draft_gemm import DRAFT_GEMM_ENV, prepacked_linear_factory

    monkeypatch.setenv(DRAFT_GEMM_ENV, "torch")
    assert prepacked_linear_factory(torch.device("cpu")) is None
    monkeypatch.setenv(DRAFT_GEMM_ENV, "mkl")
    with pytest.raises(ValueError, match="VLLM_MEDUSA_DRAFT_GEMM must be 'onednn' or 'torch'"):
        prepacked_linear_factory(torch.device("cpu"))
    monkeypatch.delenv(DRAFT_GEMM_ENV)
    assert prepacked_linear_factory(torch.device("meta")) is None  # only CPUs repack
