"""How many tree nodes to draft in a step, so that speculation never costs throughput.

Verifying a tree of ``n`` nodes makes every drafting request cost ``n + 1`` tokens in the next
forward pass instead of one. Where a forward pass costs about the same for 1 or 64 tokens (a
memory-bound GPU at small batch) the whole tree is free; on a compute-bound CPU, or at a large
batch anywhere, it is not, and a tree that is accepted rarely makes serving slower than plain
decoding. The policy here picks, per step, the number ``n`` of tree nodes (a breadth-first
prefix of the tree, so always a valid tree; ``n = 0`` is plain decoding) that maximises the
expected tokens per second::

    rate(n) = (B * (1 + sum_{m <= n} p_m) + O) / (cost(O + B * (1 + n)) + [n > 0] * draft(B))

with ``B`` requests that may draft, ``O`` other requests (one token each), ``p_m`` the
probability that tree node ``m`` is on the accepted path, ``cost(T)`` the measured time of a
forward pass plus LM head over ``T`` tokens and ``draft(B)`` that of running the heads and
filling the tree for ``B`` requests (skipped when nothing is drafted).

For greedy acceptance the accepted nodes form one path (siblings carry distinct tokens, and at
most one of them equals the parent's argmax), and whether node ``m`` is accepted does not depend
on which other nodes were drafted, so the expected accepted length of any ancestor-closed subset
of the tree is the sum of its nodes' ``p_m``.

Pure PyTorch/NumPy: no vLLM here. The vLLM integration measures ``cost`` at engine start and
feeds acceptance counts back after every verification step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StepCostModel:
    """Time of one forward pass as a function of its token count (piecewise linear).

    Built from measurements at a few token counts; interpolates between them and extrapolates
    linearly beyond the largest (a forward pass is at least linear in tokens once compute
    bound).
    """

    def __init__(self, num_tokens: Sequence[int], seconds: Sequence[float]):
        tokens = np.asarray(num_tokens, dtype=np.float64)
        secs = np.asarray(seconds, dtype=np.float64)
        if tokens.ndim != 1 or tokens.shape != secs.shape or len(tokens) < 2:
            raise ValueError("StepCostModel needs at least two (num_tokens, seconds) points")
        if np.any(np.diff(tokens) <= 0):
            raise ValueError(f"token counts must increase strictly, got {tokens.tolist()}")
        if np.any(secs <= 0) or not np.all(np.isfinite(secs)):
            raise ValueError(f"step times must be positive and finite, got {secs.tolist()}")
        # Measurements are noisy; the true cost never decreases with more tokens.
        self.num_tokens = tokens
        self.seconds = np.maximum.accumulate(secs)

    def __call__(self, num_tokens) -> np.ndarray:
        t = np.asarray(num_tokens, dtype=np.float64)
        inside = np.interp(t, self.num_tokens, self.seconds)
        slope = (self.seconds[-1] - self.seconds[-2]) / (self.num_tokens[-1] - self.num_tokens[-2])
        beyond = self.seconds[-1] + slope * (t - self.num_tokens[-1])
        return np.where(t > self.num_tokens[-1], beyond, inside)

    def to_dict(self) -> dict:
        return {"num_tokens": self.num_tokens.tolist(), "seconds": self.seconds.tolist()}


class NodeAcceptance:
    """Running estimate of ``p_m``, the probability that tree node ``m`` is accepted.

    Counts decay geometrically (``decay`` per update) so the estimate follows the traffic.
    Each node starts with ``prior_weight`` pseudo-observations at ``prior``: optimistic by
    default, so that a fresh engine drafts and learns instead of never trying.
    """

    def __init__(
        self,
        num_nodes: int,
        prior: float | Sequence[float] = 1.0,
        prior_weight: float = 4.0,
        decay: float = 0.995,
    ):
        if num_nodes < 1:
            raise ValueError("a tree has at least one node")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        prior_arr = np.broadcast_to(np.asarray(prior, dtype=np.float64), (num_nodes,)).copy()
        if np.any((prior_arr < 0) | (prior_arr > 1)):
            raise ValueError("prior acceptance probabilities must lie in [0, 1]")
        self.decay = decay
        self.proposed = np.full(num_nodes, prior_weight, dtype=np.float64)
        self.accepted = prior_arr * prior_weight

    def update(self, proposed: np.ndarray, accepted: np.ndarray) -> None:
        """Add one verification step: per node, how many requests drafted / accepted it."""
        self.proposed = self.proposed * self.decay + proposed
        self.accepted = self.accepted * self.decay + accepted

    @property
    def probabilities(self) -> np.ndarray:
        return self.accepted / np.maximum(self.proposed, 1e-9)


def choose_num_nodes(
    num_drafting: int,
    num_other: int,
    node_probabilities: np.ndarray,
    cost: StepCostModel,
    max_nodes: int | None = None,
    draft_seconds: float = 0.0,
) -> int:
    """The breadth-first tree prefix length (0 = no drafts) with the best expected rate.

    ``draft_seconds``: the cost of drafting for the ``num_drafting`` requests, paid only when
    ``n > 0``.
    """
    p = np.asarray(node_probabilities, dtype=np.float64)
    if max_nodes is not None:
        p = p[:max_nodes]
    if num_drafting <= 0 or len(p) == 0:
        return 0
    n = np.arange(len(p) + 1)
    expected_tokens = num_drafting * (1.0 + np.concatenate([[0.0], np.cumsum(p)])) + num_other
    seconds = cost(num_other + num_drafting * (1 + n)) + np.where(n > 0, draft_seconds, 0.0)
    rate = expected_tokens / seconds
    # Ties (and noise-level gains) go to fewer nodes: cheaper and never worse.
    return int(np.argmax(rate >= rate.max() * (1 - 1e-9)))
