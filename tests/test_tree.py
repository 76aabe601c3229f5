"""Token trees: parsing, validation, presets and verification buffers.

Every buffer is checked against a brute-force reference computed here from the rank paths
alone (plain Python: prefixes, sorting, enumeration), never through the module's internals.
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_medusa.core.tree import MedusaTree, TreeBuffers, TreeError, chain_paths, preset_paths
from vllm_medusa.core.tree_presets import PUBLISHED_TREES


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
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- random trees ---------------------------------------------------------------------------
@st.composite
def rank_trees(draw, max_nodes: int = 40, max_depth: int = 5, max_rank: int = 6):
    """A random valid tree, grown by adding children with random unused ranks to random
    existing nodes (the root included), returned as rank paths in a random order."""
    target = draw(st.integers(1, max_nodes))
    paths: list[tuple[int, ...]] = []
    present: set[tuple[int, ...]] = set()
    for _ in range(target):
        open_parents = [()] + [p for p in paths if len(p) < max_depth]
        parent = draw(st.sampled_from(open_parents))
        free = [r for r in range(max_rank) if parent + (r,) not in present]
        if not free:
            continue
        child = parent + (draw(st.sampled_from(free)),)
        paths.append(child)
        present.add(child)
    order = draw(st.permutations(paths))
    return [list(p) for p in order]


def random_tree_paths(rng: random.Random, max_nodes=40, max_depth=5, max_rank=6):
    """The same growth process driven by a ``random.Random`` (for non-hypothesis tests)."""
    paths: list[tuple[int, ...]] = []
    present: set[tuple[int, ...]] = set()
    for _ in range(rng.randint(1, max_nodes)):
        parent = rng.choice([()] + [p for p in paths if len(p) < max_depth])
        free = [r for r in range(max_rank) if parent + (r,) not in present]
        if free:
            child = parent + (rng.choice(free),)
            paths.append(child)
            present.add(child)
    rng.shuffle(paths)
    return [list(p) for p in paths]


# ---- brute-force references -----------------------------------------------------------------
def bfs_order(paths) -> list[tuple[int, ...]]:
    """Reference node order (root excluded): by depth, then lexicographically by path."""
    return sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))


def is_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def brute_force(paths):
    """Reference parents, depths, ancestor mask and root-to-leaf node sequences."""
    nodes = [()] + bfs_order(paths)  # node 0 = root (empty path)
    index = {p: i for i, p in enumerate(nodes)}
    parents = [-1] + [index[p[:-1]] for p in nodes[1:]]
    depths = [len(p) for p in nodes]
    mask = [[is_prefix(nodes[j], nodes[i]) for j in range(len(nodes))] for i in range(len(nodes))]
    leaves = [p for p in nodes[1:] if not any(len(q) == len(p) + 1 and q[:-1] == p for q in nodes)]
    leaf_seqs = [tuple(index[leaf[:d]] for d in range(len(leaf) + 1)) for leaf in leaves]
    return nodes, parents, depths, mask, leaf_seqs


def is_valid_tree(paths) -> bool:
    s = {tuple(p) for p in paths}
    return len(s) == len(paths) and len(s) > 0 and all(p[:-1] in s for p in s if len(p) > 1)


# ---- parsing and validation -----------------------------------------------------------------
def test_missing_prefix_names_path_and_prefix():
    with pytest.raises(TreeError, match=re.escape("path [0, 1, 2]")) as info:
        MedusaTree.from_paths([[0], [0, 1, 2]])
    assert "[0, 1]" in str(info.value)
    assert "prefix" in str(info.value)


def test_missing_root_level_prefix():
    with pytest.raises(TreeError, match=r"path \[3, 0\].*prefix \[3\]"):
        MedusaTree.from_paths([[0], [3, 0]])


def test_depth_exceeds_num_heads():
    MedusaTree.from_paths([[0], [0, 0], [0, 0, 0]], num_heads=3)
    with pytest.raises(TreeError, match=r"\[0, 0, 0\].*depth 3.*2 Medusa heads"):
        MedusaTree.from_paths([[0], [0, 0], [0, 0, 0]], num_heads=2)


def test_rank_at_least_top_k():
    MedusaTree.from_paths([[0], [1], [1, 3]], top_k=4)
    with pytest.raises(TreeError, match=r"\[1, 3\].*rank 3.*top-k is 3"):
        MedusaTree.from_paths([[0], [1], [1, 3]], top_k=3)


def test_duplicates():
    with pytest.raises(TreeError, match=r"\[0, 1\] appears twice"):
        MedusaTree.from_paths([[0], [0, 1], [0, 1]])
    with pytest.raises(TreeError, match="appears twice"):
        MedusaTree.from_paths([(0,), [0]])


@pytest.mark.parametrize("paths", [[], ()])
def test_empty_tree(paths):
    with pytest.raises(TreeError, match="no nodes"):
        MedusaTree.from_paths(paths)


@pytest.mark.parametrize(
    "bad",
    [[[0], [0.0, 1]], [[0], ["1"]], [[0], [None]], [[True]], [[0], [-1]], [[0], [0, 1.5]]],
)
def test_invalid_ranks(bad):
    with pytest.raises(TreeError, match="invalid rank"):
        MedusaTree.from_paths(bad)


@pytest.mark.parametrize("bad", [[[]], [[0], []], [[0], "01"], [[0], 3]])
def test_invalid_paths(bad):
    with pytest.raises(TreeError, match="non-empty list of ranks"):
        MedusaTree.from_paths(bad)


@pytest.mark.parametrize("bad", ["[[0]]", 5, {"paths": [[0]]}])
def test_not_a_list_of_paths(bad):
    with pytest.raises(TreeError, match="list of rank paths"):
        MedusaTree.from_paths(bad)


def test_unknown_preset_lists_known():
    with pytest.raises(TreeError, match="unknown tree preset 'nope'") as info:
        MedusaTree.resolve("nope")
    message = str(info.value)
    for name in PUBLISHED_TREES:
        assert name in message
    assert "chain-N" in message


@pytest.mark.parametrize("name", ["chain-0", "chain-", "chain-x", "chain--1"])
def test_bad_chain_names(name):
    with pytest.raises(TreeError):
        MedusaTree.resolve(name)


def test_tree_file_list_and_dict(tmp_path):
    paths = [[1], [0], [0, 0], [1, 2]]
    as_list = tmp_path / "tree.json"
    as_list.write_text(json.dumps(paths))
    as_dict = tmp_path / "tree_dict.json"
    as_dict.write_text(json.dumps({"paths": paths, "comment": "x"}))
    expected = bfs_order(paths)
    for spec in (as_list, str(as_list), as_dict, str(as_dict)):
        tree = MedusaTree.resolve(spec)
        assert list(tree.paths) == expected
    assert MedusaTree.resolve(as_list, num_heads=2, top_k=3).num_nodes == 4
    with pytest.raises(TreeError, match=re.escape(str(as_list))):
        MedusaTree.resolve(as_list, num_heads=1)


def test_tree_file_errors(tmp_path):
    with pytest.raises(TreeError, match="does not exist"):
        MedusaTree.resolve(tmp_path / "missing.json")
    with pytest.raises(TreeError, match="does not exist"):
        MedusaTree.resolve(str(tmp_path / "missing.json"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[[0], [0, 1")
    with pytest.raises(TreeError, match="not valid JSON"):
        MedusaTree.resolve(bad_json)
    no_paths = tmp_path / "nopaths.json"
    no_paths.write_text(json.dumps({"tree": [[0]]}))
    with pytest.raises(TreeError, match="no 'paths' key"):
        MedusaTree.resolve(no_paths)
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps([[0], [1, 1]]))
    with pytest.raises(TreeError, match=r"invalid\.json.*\[1, 1\].*prefix \[1\]"):
        MedusaTree.resolve(invalid)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(TreeError, match="list of rank paths"):
        MedusaTree.resolve(scalar)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TreeError, match=re.escape(str(binary))):
        MedusaTree.resolve(binary)


def test_resolve_explicit_paths_and_tree():
    tree = MedusaTree.resolve([[0, 0], [0]])
    assert tree.paths == ((0,), (0, 0))
    assert MedusaTree.resolve(tree) == tree
    with pytest.raises(TreeError):
        MedusaTree.resolve(tree, num_heads=1)


# ---- presets --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_chain_presets(n):
    tree = MedusaTree.resolve(f"chain-{n}")
    assert tree.paths == tuple((0,) * d for d in range(1, n + 1))
    assert tree.num_nodes == n and tree.depth == n and tree.top_k == 1
    assert tree.nodes_per_depth() == [1] * n
    assert tree.parents == list(range(-1, n))
    assert chain_paths(n) == [[0] * d for d in range(1, n + 1)]


def test_mc_sim_7b_63_matches_medusa_repo():
    tree = MedusaTree.resolve("mc_sim_7b_63")
    assert tree.num_nodes == 63
    assert tree.nodes_per_depth() == [10, 28, 23, 2]
    assert tree.depth == 4 and tree.top_k == 10
    # A few distinctive nodes of FasterDecoding/Medusa medusa_choices.py's mc_sim_7b_63.
    for p in [(9,), (9, 0), (1, 6), (0, 7, 0), (0, 0, 0, 1), (0, 0, 0, 0), (5, 0)]:
        assert p in tree.paths
    assert (5, 1) not in tree.paths and (0, 0, 1, 0) not in tree.paths


@pytest.mark.parametrize("name", sorted(PUBLISHED_TREES))
def test_published_presets_valid(name):
    raw = preset_paths(name)
    assert len(raw) == 63
    assert is_valid_tree(raw)
    tree = MedusaTree.resolve(name, num_heads=4, top_k=10)
    assert tree.num_nodes == 63
    assert sum(tree.nodes_per_depth()) == 63
    assert tree.nodes_per_depth()[0] == 10  # every published tree uses head 0's top-10
    assert list(tree.paths) == bfs_order(raw)
    # the preset list is not mutated by callers
    raw.append([42])
    assert len(preset_paths(name)) == 63


# ---- shape helpers --------------------------------------------------------------------------
def test_shape_helpers():
    tree = MedusaTree.from_paths([[2], [0], [0, 1], [0, 1, 4]])
    assert tree.num_nodes == 4
    assert tree.depth == 3
    assert tree.top_k == 5
    assert tree.nodes_per_depth() == [2, 1, 1]
    assert tree.to_json() == [[0], [2], [0, 1], [0, 1, 4]]
    assert MedusaTree.from_paths(tree.to_json()) == tree


def test_truncated_bounds():
    tree = MedusaTree.resolve("mc_sim_7b_63")
    assert tree.truncated(100) == tree
    assert tree.truncated(63) == tree
    assert tree.truncated(1).paths == ((0,),)
    assert tree.truncated(torch.tensor(5)) == tree.truncated(5)  # int-like counts
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(TreeError, match="at least one node"):
            tree.truncated(bad)


# ---- buffers vs brute force -----------------------------------------------------------------
def check_buffers(paths) -> None:
    nodes, parents, depths, mask, leaf_seqs = brute_force(paths)
    tree = MedusaTree.from_paths(paths)
    n = len(nodes)

    # BFS order: same node order as the reference, depth non-decreasing.
    assert list(tree.paths) == nodes[1:]
    assert all(len(a) <= len(b) for a, b in zip(tree.paths, tree.paths[1:], strict=False))
    assert tree.parents == parents
    assert tree.depths == depths

    buf = tree.buffers()
    assert buf.parents.tolist() == parents
    assert buf.depths.tolist() == depths
    assert buf.ancestor_mask.dtype == torch.bool
    assert buf.ancestor_mask.shape == (n, n)
    assert buf.ancestor_mask.tolist() == mask
    # spelled-out consequences
    assert buf.ancestor_mask[0].tolist() == [True] + [False] * (n - 1)
    assert bool(buf.ancestor_mask[:, 0].all())
    assert bool(buf.ancestor_mask.diagonal().all())

    # leaf paths: root first, -1 padded to depth + 1, one row per leaf.
    assert buf.leaf_paths.shape == (len(leaf_seqs), tree.depth + 1)
    rows = []
    for row, d in zip(buf.leaf_paths.tolist(), buf.leaf_depths.tolist(), strict=True):
        seq = tuple(x for x in row if x >= 0)
        assert row == list(seq) + [-1] * (len(row) - len(seq))
        assert len(seq) == d + 1
        rows.append(seq)
    assert sorted(rows) == sorted(leaf_seqs)
    assert len(set(rows)) == len(rows)
    # rows come in leaf node order (the tie-break order of acceptance)
    assert [r[-1] for r in rows] == sorted(r[-1] for r in rows)

    # candidate_index through fill(): node with path p takes candidates[b, len(p)-1, p[-1]].
    g = torch.Generator().manual_seed(len(paths))
    for extra_heads, extra_k in [(0, 0), (2, 3)]:
        num_heads, k = tree.depth + extra_heads, tree.top_k + extra_k
        cands = torch.randint(0, 1000, (3, num_heads, k), generator=g)
        filled = buf.fill(cands)
        assert filled.shape == (3, n - 1)
        expected = [[int(cands[b, len(p) - 1, p[-1]]) for p in nodes[1:]] for b in range(3)]
        assert filled.tolist() == expected
        # A breadth-first prefix needs only the heads down to its depth.
        for m in range(n):
            depth = max((len(p) for p in nodes[1 : m + 1]), default=0)
            assert buf.depth_of_prefix(m) == depth
            prefix = buf.fill(cands[:, : max(depth, 1)], num_nodes=m)
            assert prefix.tolist() == [row[:m] for row in expected]

    # every prefix of the node list is a valid tree, equal to truncated(m)
    for m in range(1, n):
        assert is_valid_tree(list(tree.paths[:m]))
        trunc = tree.truncated(m)
        assert trunc.paths == tree.paths[:m]
        assert MedusaTree.from_paths(trunc.to_json()) == trunc
        if m in (1, n // 2, n - 1):
            check_truncated = brute_force(trunc.to_json())
            assert trunc.buffers().parents.tolist() == check_truncated[1]


@SETTINGS
@given(rank_trees())
def test_buffers_match_brute_force(paths):
    check_buffers(paths)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TREES) + ["chain-1", "chain-5"])
def test_buffers_of_presets(name):
    check_buffers(preset_paths(name))


def test_buffers_on_device_argument():
    buf = MedusaTree.resolve("chain-2").buffers(device="cpu")
    assert isinstance(buf, TreeBuffers)
    assert buf.top_k == 1
    assert buf.leaf_paths.tolist() == [[0, 1, 2]]
    assert buf.leaf_depths.tolist() == [2]
    assert buf.candidate_index.tolist() == [0, 1]


def test_candidate_index_layout():
    tree = MedusaTree.from_paths([[0], [2], [0, 1], [2, 0]])
    buf = tree.buffers()
    # flattened [num_heads * top_k] layout with top_k = 3
    assert buf.candidate_index.tolist() == [0, 2, 3 + 1, 3 + 0]


def test_fill_errors():
    buf = MedusaTree.from_paths([[0], [1], [1, 0], [1, 0, 2]]).buffers()
    with pytest.raises(ValueError, match="top-3"):
        buf.fill(torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="3 heads|depth 3"):
        buf.fill(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, K, k\]"):
        buf.fill(torch.zeros(3, 3, dtype=torch.long))
    # the first 3 nodes reach depth 2: two heads are enough, one is not
    assert buf.fill(torch.zeros(1, 2, 3, dtype=torch.long), num_nodes=3).shape == (1, 3)
    with pytest.raises(ValueError, match="first 3 tree nodes reach depth 2"):
        buf.fill(torch.zeros(1, 1, 3, dtype=torch.long), num_nodes=3)
    with pytest.raises(ValueError, match="num_nodes"):
        buf.fill(torch.zeros(1, 3, 3, dtype=torch.long), num_nodes=5)
