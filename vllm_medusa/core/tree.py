"""Medusa token trees: parsing, validation, presets and verification buffers.

A tree is a list of *rank paths*: ``[0]`` is head 0's top-1 guess, ``[0, 1]`` is head 0's top-1
followed by head 1's top-2, and so on (the format of Medusa's ``medusa_choices`` and
TensorRT-LLM's ``--medusa_choices``). The implicit root is the token the base model has just
produced; a node at depth ``d`` (root = 0) holds a guess of head ``d - 1``.

Nodes are numbered in breadth-first order (by depth, then by path), root = 0. That order is
topological, so any prefix of the flattened node list is itself a valid tree: a scheduler that
truncates the drafts to fit a token budget still leaves a well-formed tree.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from vllm_medusa.core.tree_presets import PUBLISHED_TREES

Path_ = tuple[int, ...]


class TreeError(ValueError):
    """An invalid tree specification."""


def chain_paths(length: int) -> list[list[int]]:
    """The top-1 chain of ``length`` nodes (what vLLM's own Medusa drafts)."""
    if length < 1:
        raise TreeError(f"a chain needs at least one node, got {length}")
    return [[0] * d for d in range(1, length + 1)]


def preset_names() -> list[str]:
    return sorted(PUBLISHED_TREES) + ["chain-N (N >= 1)"]


def preset_paths(name: str) -> list[list[int]]:
    """Rank paths of a named preset: a published tree or ``chain-N``."""
    if name in PUBLISHED_TREES:
        return [list(p) for p in PUBLISHED_TREES[name]]
    if name.startswith("chain-") and name[len("chain-") :].isdigit():
        return chain_paths(int(name[len("chain-") :]))
    raise TreeError(f"unknown tree preset {name!r}; known presets: {', '.join(preset_names())}")


def _normalise_paths(paths: Sequence[Sequence[int]], source: str) -> list[Path_]:
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise TreeError(
            f"{source}: a tree must be a list of rank paths, got {type(paths).__name__}"
        )
    if len(paths) == 0:
        raise TreeError(f"{source}: the tree has no nodes")
    out: list[Path_] = []
    for p in paths:
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise TreeError(f"{source}: each path must be a non-empty list of ranks, got {p!r}")
        for r in p:
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise TreeError(f"{source}: path {list(p)} has an invalid rank {r!r}")
        out.append(tuple(int(r) for r in p))
    return out


@dataclass(frozen=True)
class MedusaTree:
    """A validated token tree. ``paths`` excludes the root and is in node (BFS) order."""

    paths: tuple[Path_, ...]

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[Sequence[int]],
        *,
        num_heads: int | None = None,
        top_k: int | None = None,
        source: str = "tree",
    ) -> MedusaTree:
        """Validate ``paths`` (every prefix present, no duplicates, depth <= ``num_heads``,
        rank < ``top_k``) and put the nodes in breadth-first order."""
        norm = _normalise_paths(paths, source)
        seen: set[Path_] = set()
        for p in norm:
            if p in seen:
                raise TreeError(f"{source}: path {list(p)} appears twice")
            seen.add(p)
        for p in norm:
            if len(p) > 1 and p[:-1] not in seen:
                raise TreeError(
                    f"{source}: path {list(p)} has no parent: its prefix {list(p[:-1])} "
                    "is not in the tree"
                )
            if num_heads is not None and len(p) > num_heads:
                raise TreeError(
                    f"{source}: path {list(p)} has depth {len(p)} but there are only "
                    f"{num_heads} Medusa heads"
                )
            if top_k is not None and max(p) >= top_k:
                raise TreeError(
                    f"{source}: path {list(p)} uses rank {max(p)} but top-k is {top_k} "
                    f"(ranks must be < {top_k})"
                )
        return cls(tuple(sorted(norm, key=lambda p: (len(p), p))))

    @classmethod
    def resolve(
        cls,
        spec: str | Path | Sequence[Sequence[int]],
        *,
        num_heads: int | None = None,
        top_k: int | None = None,
    ) -> MedusaTree:
        """A tree from a preset name, a JSON file (a list of paths or ``{"paths": [...]}``)
        or an explicit list of paths."""
        if isinstance(spec, MedusaTree):
            return cls.from_paths(spec.paths, num_heads=num_heads, top_k=top_k)
        if isinstance(spec, Path) or (
            isinstance(spec, str) and (spec.endswith(".json") or Path(spec).is_file())
        ):
            file = Path(spec)
            if not file.is_file():
                raise TreeError(f"tree file {file} does not exist")
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TreeError(f"tree file {file} is not valid JSON: {e}") from e
            except OSError as e:
                raise TreeError(f"tree file {file} cannot be read: {e}") from e
            if isinstance(data, dict):
                if "paths" not in data:
                    raise TreeError(f"tree file {file} has no 'paths' key")
                data = data["paths"]
            return cls.from_paths(data, num_heads=num_heads, top_k=top_k, source=str(file))
        if isinstance(spec, str):
            paths = preset_paths(spec)
            return cls.from_paths(paths, num_heads=num_heads, top_k=top_k, source=f"preset {spec}")
        return cls.from_paths(spec, num_heads=num_heads, top_k=top_k)

    # ---- shape -------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        """Number of draft nodes, root excluded."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def top_k(self) -> int:
        """The smallest top-k that covers every rank in the tree."""
        return max(max(p) for p in self.paths) + 1

    def nodes_per_depth(self) -> list[int]:
        counts = [0] * self.depth
        for p in self.paths:
            counts[len(p) - 1] += 1
        return counts

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    def truncated(self, num_nodes: int) -> MedusaTree:
        """The first ``num_nodes`` nodes (a valid tree, by BFS order)."""
        try:
            count = operator.index(num_nodes)  # ints, numpy ints; not floats
        except TypeError:
            count = 0
        if isinstance(num_nodes, bool) or count < 1:
            raise TreeError(f"a truncated tree needs at least one node, got {num_nodes!r}")
        return MedusaTree(self.paths[:count])

    # ---- index arrays (root = node 0) ----------------------------------------------------
    @cached_property
    def parents(self) -> list[int]:
        """Parent node of every node; the root's parent is -1."""
        index = {p: i + 1 for i, p in enumerate(self.paths)}
        return [-1] + [index[p[:-1]] if len(p) > 1 else 0 for p in self.paths]

    @cached_property
    def depths(self) -> list[int]:
        """Depth of every node (root 0): the position offset of the node after the context."""
        return [0] + [len(p) for p in self.paths]

    def buffers(self, device: torch.device | str = "cpu") -> TreeBuffers:
        return TreeBuffers.build(self, device)


@dataclass
class TreeBuffers:
    """Tensors that verification and acceptance need, for a tree with N nodes plus root.

    - ``parents`` ``[N+1]`` (root -1), ``depths`` ``[N+1]`` (root 0);
    - ``ancestor_mask`` ``[N+1, N+1]`` bool: ``[i, j]`` is True when node j is node i or one
      of its ancestors: what node i may attend to inside the tree;
    - ``candidate_index`` ``[N]``: index of node n+1's token in the flattened head candidates
      ``[num_heads * top_k]`` (head = depth - 1, rank = last path entry);
    - ``leaf_paths`` ``[P, D+1]``: node indices along every root-to-leaf path, root first,
      padded with -1; ``leaf_depths`` ``[P]``.
    """

    parents: torch.Tensor
    depths: torch.Tensor
    ancestor_mask: torch.Tensor
    candidate_index: torch.Tensor
    leaf_paths: torch.Tensor
    leaf_depths: torch.Tensor
    top_k: int

    @classmethod
    def build(cls, tree: MedusaTree, device: torch.device | str = "cpu") -> TreeBuffers:
        n = tree.num_nodes + 1
        parents = tree.parents
        top_k = tree.top_k
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = parents[j]
        is_parent = set(parents[1:])
        leaves = [i for i in range(1, n) if i not in is_parent]
        leaf_paths = torch.full((len(leaves), tree.depth + 1), -1, dtype=torch.long)
        for row, leaf in enumerate(leaves):
            chain = []
            j = leaf
            while j >= 0:
                chain.append(j)
                j = parents[j]
            leaf_paths[row, : len(chain)] = torch.tensor(chain[::-1])
        candidate_index = [(len(p) - 1) * top_k + p[-1] for p in tree.paths]
        return cls(
            parents=torch.tensor(parents, dtype=torch.long, device=device),
            depths=torch.tensor(tree.depths, dtype=torch.long, device=device),
            ancestor_mask=mask.to(device),
            candidate_index=torch.tensor(candidate_index, dtype=torch.long, device=device),
            leaf_paths=leaf_paths.to(device),
            leaf_depths=torch.tensor([tree.depths[leaf] for leaf in leaves], device=device),
            top_k=top_k,
        )

    def fill(self, candidates: torch.Tensor, num_nodes: int | None = None) -> torch.Tensor:
        """Tree node tokens from head candidates ``[B, K, k]`` (k >= top_k) -> ``[B, N]``.

        ``num_nodes``: fill only the first ``n`` nodes (a breadth-first prefix, itself a tree);
        then only the heads down to node ``n``'s depth are needed.
        """
        if candidates.dim() != 3:
            raise ValueError(
                f"candidates must be [B, K, k] (batch, heads, top-k), got {tuple(candidates.shape)}"
            )
        num_tree_nodes = self.candidate_index.shape[0]
        n = num_tree_nodes if num_nodes is None else num_nodes
        if not 0 <= n <= num_tree_nodes:
            raise ValueError(f"num_nodes must be in [0, {num_tree_nodes}], got {num_nodes}")
        b, k_heads, k = candidates.shape
        if k < self.top_k:
            raise ValueError(f"tree needs top-{self.top_k} candidates, got top-{k}")
        depth = self.depth_of_prefix(n)
        if k_heads < depth:
            raise ValueError(
                f"the first {n} tree nodes reach depth {depth} and need candidates of "
                f"{depth} heads, got {k_heads}"
            )
        flat = candidates[:, :, : self.top_k].reshape(b, k_heads * self.top_k)
        return flat[:, self.candidate_index[:n]]

    def depth_of_prefix(self, num_nodes: int) -> int:
        """Depth reached by the first ``num_nodes`` nodes (breadth-first order): the number
        of heads that drafting them needs."""
        return int(self.depths[: num_nodes + 1].max())
