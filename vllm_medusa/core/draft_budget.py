"""How many tree nodes to draft in a step, so that speculation never costs throughput.

Verifying a tree of ``n`` nodes makes every drafting request cost ``n + 1`` tokens in the next
forward pass instead of one. Where a forward pass costs about the same for 1 or 64 tokens (a
memory-bound GPU at small batch) the whole tree is free; on a compute-bound CPU, or at a large
batch anywhere, it is not, and a tree that is accepted rarely makes serving slower than plain
decoding. The policy here picks, per step, the number ``n`` of tree nodes (a breadth-first
prefix of the tree, so always a valid tree; ``n = 0`` is plain decoding) that maximises the
expected tokens per second::

    rate(n) = (B * (1 + sum_{m <= n} p_m) + O)
              / (cost(O + B * (1 + n)) + [n > 0] * (draft(B, depth(n)) + extra(B, n)))

with ``B`` requests that may draft, ``O`` other requests (one token each), ``p_m`` the
probability that tree node ``m`` is on the accepted path, ``cost(T)`` the measured time of a
forward pass plus LM head over ``T`` tokens, ``draft(B, d)`` that of running the first ``d``
heads and filling the tree for ``B`` requests (skipped when nothing is drafted) and
``extra(B, n)`` the measured overhead of verification beyond the table.

For greedy acceptance the accepted nodes form one path (siblings carry distinct tokens, and at
most one of them equals the parent's argmax), and whether node ``m`` is accepted does not depend
on which other nodes were drafted, so the expected accepted length of any ancestor-closed subset
of the tree is the sum of its nodes' ``p_m``.

Pure PyTorch/NumPy: no vLLM here. The vLLM integration measures ``cost`` and ``draft`` at
engine start, feeds acceptance counts back after every verification step, and feeds every
decode step's measured time back to :class:`VerifyOverhead`, which learns what the table
leaves out (attention over the context, tree fix-up, KV compaction, bookkeeping).
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
        # The true cost never decreases with more tokens, and timing noise only ever adds
        # time: a point above a later (larger) one is noise, so the table is the lower
        # envelope from the right. (Raising later points to an earlier outlier instead would
        # make the tokens between them look free, and drafting there profitable.)
        self.num_tokens = tokens
        self.seconds = np.minimum.accumulate(secs[::-1])[::-1]

    def __call__(self, num_tokens) -> np.ndarray:
        t = np.asarray(num_tokens, dtype=np.float64)
        inside = np.interp(t, self.num_tokens, self.seconds)
        slope = (self.seconds[-1] - self.seconds[-2]) / (self.num_tokens[-1] - self.num_tokens[-2])
        beyond = self.seconds[-1] + slope * (t - self.num_tokens[-1])
        return np.where(t > self.num_tokens[-1], beyond, inside)

    def to_dict(self) -> dict:
        return {"num_tokens": self.num_tokens.tolist(), "seconds": self.seconds.tolist()}


class NodeAcceptance:
    """Running estimate of ``p_m``, the probability that tree node ``m`` is on the accepted
    path, learnt the way the tree is accepted: along paths.

    Per node, ``q_m`` = P(``m`` accepted | ``m`` drafted and its parent accepted), from the
    steps that tested ``m`` (its parent on the accepted path, or the root); then ``p_m = q_m
    p_parent(m)``. So a child is never more likely than its parent, and siblings, of which
    acceptance keeps at most one, never add up past their parent (their ``q`` are scaled
    down when they would). Estimating each ``p_m`` on its own instead lets nodes that are
    rarely drafted keep an optimistic value: 16 nodes at ~0.25 each promise 4 accepted
    tokens where the tree gives one, and the budget drafts whole trees where they lose.

    Observations fade by ``decay`` every step (:meth:`forget`), drafting or not, so the
    estimate follows the traffic. Each node also holds ``prior_weight`` pseudo-observations
    at ``prior`` (default ``1 / (siblings + 1)``: a parent's children share at most all of
    its acceptance) that never fade, so that a fresh engine drafts where a tree is cheap
    and learns, and an engine that stopped drafting tries again now and then.
    """

    def __init__(
        self,
        parents: Sequence[int],
        prior: float | Sequence[float] | None = None,
        prior_weight: float = 4.0,
        decay: float = 0.995,
    ):
        parents_arr = np.asarray(parents, dtype=np.int64)
        num_nodes = len(parents_arr) - 1
        if num_nodes < 1:
            raise ValueError("a tree has at least one node")
        if parents_arr[0] != -1 or np.any(
            (parents_arr[1:] < 0) | (parents_arr[1:] >= np.arange(1, num_nodes + 1))
        ):
            raise ValueError(
                "parents must give the root -1 and every node an earlier node (breadth-first)"
            )
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be positive, got {prior_weight}")
        self.parents = parents_arr[1:]  # [N]: parent of node m + 1 (0 = root)
        children = np.bincount(self.parents, minlength=num_nodes + 1)  # [N + 1]
        if prior is None:
            prior = 1.0 / (children[self.parents] + 1)
        prior_arr = np.broadcast_to(np.asarray(prior, dtype=np.float64), (num_nodes,)).copy()
        if np.any((prior_arr < 0) | (prior_arr > 1)):
            raise ValueError("prior acceptance probabilities must lie in [0, 1]")
        depths = np.zeros(num_nodes + 1, dtype=np.int64)
        for m in range(1, num_nodes + 1):  # once per engine
            depths[m] = depths[self.parents[m - 1]] + 1
        # Node ids (1-based) by depth, to chain p from the root down one depth at a time.
        self._levels = [np.flatnonzero(depths == d) for d in range(1, depths.max() + 1)]
        self.decay = decay
        self.prior_tested = prior_weight
        self.prior_accepted = prior_arr * prior_weight
        self.tested = np.zeros(num_nodes, dtype=np.float64)
        self.accepted = np.zeros(num_nodes, dtype=np.float64)

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    def forget(self) -> None:
        """One step passed: observations fade."""
        self.tested *= self.decay
        self.accepted *= self.decay

    def update(self, tested: np.ndarray, accepted: np.ndarray) -> None:
        """Add counts per node: requests that tested it (drafted it with its parent
        accepted) and that accepted it."""
        self.tested += tested
        self.accepted += accepted

    def observe_step(self, num_draft: np.ndarray, accepted_nodes: np.ndarray) -> np.ndarray:
        """Add one verification step: drafted node counts ``[B]`` (a breadth-first prefix
        each) and accepted node ids ``[B, D]`` (1-based, -1 padding). Returns the accepted
        count per node ``[N]``."""
        b, n = len(num_draft), self.num_nodes
        on_path = np.zeros((b, n + 1), dtype=bool)  # [B, N + 1], root accepted
        on_path[:, 0] = True
        rows, cols = np.nonzero(accepted_nodes > 0)
        on_path[rows, accepted_nodes[rows, cols]] = True
        drafted = np.arange(1, n + 1)[None, :] <= np.asarray(num_draft)[:, None]  # [B, N]
        tested = (drafted & on_path[:, self.parents]).sum(axis=0)
        accepted = (drafted & on_path[:, 1:]).sum(axis=0)
        self.update(tested, accepted)
        return accepted

    @property
    def conditional(self) -> np.ndarray:
        """``q_m`` ``[N]``, siblings scaled to add up to at most 1."""
        q = (self.accepted + self.prior_accepted) / (self.tested + self.prior_tested)
        siblings = np.bincount(self.parents, weights=q, minlength=self.num_nodes + 1)
        return q / np.maximum(siblings[self.parents], 1.0)

    @property
    def probabilities(self) -> np.ndarray:
        """``p_m`` ``[N]``."""
        q = self.conditional
        p = np.ones(self.num_nodes + 1)
        for level in self._levels:
            p[level] = q[level - 1] * p[self.parents[level - 1]]
        return p[1:]


class VerifyOverhead:
    """What a step costs beyond the cost table, learned online from measured step times.

    The table times the forward pass and LM head (and, separately, the heads); a real step
    also spends time on attention over the context, the tree attention fix-up, acceptance,
    KV compaction and the runner's bookkeeping. The residual of each measured decode step
    (measured - table) is modelled as::

        residual = r0 + r1 * R + a * B + c * D

    with ``R`` requests in the step, ``B`` of them verifying drafts, ``D`` draft tokens.
    ``a * B + c * B * n`` is then the extra time of drafting ``n`` nodes for ``B`` requests.

    One least-squares fit of all four terms is not identifiable when every step drafts
    (``R``, ``B`` and ``D`` then move together, and the residual could be anyone's), so the
    fit has two stages, each by exponentially weighted least squares:

    - the baseline ``r0 + r1 * R`` from steps with nothing to verify only;
    - ``a`` and ``c`` from verifying steps, on their residual minus that baseline.

    Until a plain step is seen the baseline is 0 (the table is trusted for plain decoding), so
    an engine that always drafts charges its whole residual to drafting: it may then draft
    less, which shows it plain steps and corrects the baseline; the opposite error (drafting
    looking free) would never be corrected. A ridge pulls ``a`` and ``c`` towards 0, so with
    few verifying steps (a new engine, or one that stopped drafting long ago) the table's own
    estimate is trusted.
    """

    def __init__(self, decay: float = 0.995, ridge: float = 1.0):
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.base_ridge = np.diag([1e-6, 1e-6])  # only to make one-size batches solvable
        self.draft_ridge = np.diag([ridge, ridge])
        # Sufficient statistics of x = [1, R, B, D], for plain and for verifying steps.
        self.xtx = np.zeros((2, 4, 4))
        self.xty = np.zeros((2, 4))
        self.coef = np.zeros(4)  # [r0, r1, a, c]
        self.num_verify_steps = 0.0

    def forget(self) -> None:
        self.xtx *= self.decay
        self.xty *= self.decay
        self.num_verify_steps *= self.decay

    def observe(
        self, num_requests: int, num_verifying: int, num_draft_tokens: int, residual: float
    ) -> None:
        x = np.array([1.0, num_requests, num_verifying, num_draft_tokens])
        kind = int(num_verifying > 0)
        self.xtx[kind] += np.outer(x, x)
        self.xty[kind] += x * residual
        self.num_verify_steps += kind
        base = np.linalg.solve(self.xtx[0, :2, :2] + self.base_ridge, self.xty[0, :2])
        xtx, xty = self.xtx[1], self.xty[1]
        draft = np.linalg.solve(xtx[2:, 2:] + self.draft_ridge, xty[2:] - xtx[2:, :2] @ base)
        self.coef = np.concatenate([base, draft])

    def extra_seconds(self, num_drafting: int, num_nodes: np.ndarray) -> np.ndarray:
        """Extra time of a step in which ``num_drafting`` requests verify ``num_nodes`` nodes
        each (0 for ``num_nodes == 0``; never negative: noise must not make drafting look
        cheaper than the table)."""
        n = np.asarray(num_nodes, dtype=np.float64)
        extra = self.coef[2] * num_drafting + self.coef[3] * num_drafting * n
        return np.where(n > 0, np.maximum(extra, 0.0), 0.0)


def choose_num_nodes(
    num_drafting: int,
    num_other: int,
    node_probabilities: np.ndarray,
    cost: StepCostModel,
    max_nodes: int | None = None,
    draft_seconds: float | np.ndarray = 0.0,
    min_gain: float = 0.0,
) -> int:
    """The breadth-first tree prefix length (0 = no drafts) with the best expected rate.

    ``draft_seconds``: time a step spends on drafting beyond the forward pass, paid only when
    ``n > 0``: one number, or one per prefix length ``n = 0 .. N`` (drafting a deeper prefix
    runs more heads; verifying more nodes costs more attention and bookkeeping).
    ``min_gain``: drafting must beat plain decoding's expected rate by this fraction, else
    ``0``: the costs and acceptance rates are estimates, and an error that makes a
    break-even draft look profitable makes serving slower than plain decoding.
    """
    p = np.asarray(node_probabilities, dtype=np.float64)
    if max_nodes is not None:
        p = p[:max_nodes]
    if num_drafting <= 0 or len(p) == 0:
        return 0
    n = np.arange(len(p) + 1)
    extra = np.asarray(draft_seconds, dtype=np.float64)
    extra = extra[: len(n)] if extra.ndim else np.full(len(n), float(extra))
    if extra.shape != n.shape:
        raise ValueError(f"draft_seconds needs one value per prefix length 0..{len(p)}")
    expected_tokens = num_drafting * (1.0 + np.concatenate([[0.0], np.cumsum(p)])) + num_other
    seconds = cost(num_other + num_drafting * (1 + n)) + np.where(n > 0, extra, 0.0)
    rate = expected_tokens / seconds
    if rate.max() < rate[0] * (1 + min_gain):
        return 0
    # Ties (and noise-level gains) go to fewer nodes: cheaper and never worse.
    return int(np.argmax(rate >= rate.max() * (1 - 1e-9)))
