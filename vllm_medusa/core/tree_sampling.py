"""Sampling with trees: the target distribution at every node, and exact tree rejection
sampling (typical acceptance over processed distributions is
:func:`vllm_medusa.core.acceptance.typical_accept_probs`).

Shapes, for B requests and a tree of N nodes plus root (node order of :class:`TreeBuffers`):
``node_tokens`` ``[B, N+1]`` (column 0: the root), ``probs`` ``[B, N+1, V]``: the target
distribution of the token that follows each node (the request's temperature, min-p, top-k and
top-p applied to the base model's logits, :func:`target_probs`).

Exact tree rejection sampling (:func:`exact_tree_accept`) is multi-candidate speculative
sampling (SpecInfer; "recursive rejection sampling") with deterministic drafts. Starting at
the root with the residual ``r = p(root)``, the children of the current node are tried one
after another in node order: child token ``x`` is accepted with probability
``r(x) / sum(r)``; on acceptance the walk moves to the child (``r = p(child)``), otherwise
``x`` is removed from ``r`` (``r(x) = 0``: the residual ``max(0, r - q)`` of a point-mass
proposal ``q = delta_x``) and the next child is tried against the renormalised residual.
When no child is accepted (or the node is a leaf) the bonus token is drawn from the
normalised residual. The drafts are a deterministic function of the context (the top-k picks
of the heads), i.e. each tried child is a point-mass proposal, independent of the
acceptance randomness. One try emits ``x`` with probability ``r(x)/|r|`` and any other ``y``
with probability ``(1 - r(x)/|r|) * r(y) / (|r| - r(x)) = r(y)/|r|``: the token that
follows a node is distributed exactly as ``p`` at that node, whatever the drafts, and by the
chain rule every emitted sequence is distributed as plain sampling. A duplicate sibling token
has ``r(x) = 0`` after the first try and is always rejected, which keeps this exact.

Randomness: per request, one uniform per tree node (each node is tried at most once) and one
exponential per vocabulary entry for the final draw (``argmax(r / E)`` samples ``r / |r|``),
drawn from the request's ``torch.Generator`` when it has one (:func:`draw_noise`).
"""

from __future__ import annotations

import torch

from vllm_medusa.core.acceptance import AcceptanceResult, _check_shapes, sample_with_noise
from vllm_medusa.core.tree import TreeBuffers

SAMPLING_EPS = 1e-5  # temperatures below it decode greedily (vLLM's _SAMPLING_EPS)


def target_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distribution a sampled request draws from: ``logits`` ``[R, V]`` ->
    probabilities ``[R, V]`` (float32), in vLLM 0.32's order: temperature, min-p, top-k,
    top-p (the PyTorch path of ``apply_top_k_top_p``: top-k keeps ties with the k-th
    logit, top-p keeps the smallest top set whose mass reaches ``p``, at least one token).

    Per row: ``temperature`` ``[R]`` (> 0), ``top_k`` ``[R]`` long (``<= 0`` or ``>= V``:
    off), ``top_p`` ``[R]`` (1: off), ``min_p`` ``[R]`` (0: off).
    """
    logits = logits.to(torch.float32) / temperature.to(torch.float32)[:, None]
    v = logits.shape[-1]
    if min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.to(torch.float32)[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if top_k is not None:
        k = top_k.to(torch.long)
        k = torch.where((k <= 0) | (k > v), torch.full_like(k, v), k)
        if top_p is None:  # no sort of the vocabulary: the k-th largest logit per row
            kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
        if top_k is not None:
            kth = logits_sort.gather(1, (v - k)[:, None])
            logits_sort = logits_sort.masked_fill(logits_sort < kth, float("-inf"))
        cum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p.to(torch.float32)[:, None]
        drop[:, -1] = False
        logits_sort = logits_sort.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, logits_idx, logits_sort)
    return logits.softmax(dim=-1)


def draw_noise(
    batch: int,
    num_nodes: int,
    vocab: int,
    generators: dict[int, torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    default_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms ``[B, num_nodes]`` (one per tree node, root included) and exponentials
    ``[B, V]`` (the final draw). Row ``i`` comes from ``generators[i]`` when given (a seeded
    request: the same draws run to run), the other rows from ``default_generator`` (or the
    global RNG)."""
    generators = generators or {}
    uniforms = torch.empty(batch, num_nodes, device=device)
    exponentials = torch.empty(batch, vocab, device=device)
    if len(generators) != batch:
        uniforms.uniform_(generator=default_generator)
        exponentials.exponential_(generator=default_generator)
    for i, gen in generators.items():
        uniforms[i].uniform_(generator=gen)
        exponentials[i].exponential_(generator=gen)
    return uniforms, exponentials


def children_table(tree: TreeBuffers) -> torch.Tensor:
    """``[N+1, C]``: the children of every node in node order, padded with -1."""
    parents = tree.parents.tolist()
    kids: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if parent >= 0:
            kids[parent].append(node)
    width = max(1, max(len(k) for k in kids))
    table = torch.full((len(parents), width), -1, dtype=torch.long)
    for node, k in enumerate(kids):
        table[node, : len(k)] = torch.tensor(k, dtype=torch.long)
    return table.to(tree.parents.device)


def exact_tree_accept(
    node_tokens: torch.Tensor,
    probs: torch.Tensor,
    tree: TreeBuffers,
    uniforms: torch.Tensor,
    exponentials: torch.Tensor,
    present: torch.Tensor | None = None,
    children: torch.Tensor | None = None,
) -> AcceptanceResult:
    """Exact tree rejection sampling (module docstring) for a batch of trees.

    ``uniforms`` ``[B, N+1]`` and ``exponentials`` ``[B, V]`` from :func:`draw_noise`;
    ``present`` ``[B, N+1]`` bool (optional): nodes each request drafted (a breadth-first
    prefix, or none: a request without drafts just samples ``p(root)``); ``children`` from
    :func:`children_table` (computed when omitted).
    """
    _check_shapes(node_tokens, probs, tree)
    b, n1, _ = probs.shape
    device = probs.device
    if children is None:
        children = children_table(tree)
    depth = tree.leaf_paths.shape[1] - 1
    rows = torch.arange(b, device=device)
    residual = probs[:, 0].to(torch.float32).clone()  # [B, V]
    cur = torch.zeros(b, dtype=torch.long, device=device)
    descending = torch.ones(b, dtype=torch.bool, device=device)
    accepted_nodes = torch.full((b, depth), -1, dtype=torch.long, device=device)
    for d in range(depth):
        moved = torch.zeros(b, dtype=torch.bool, device=device)
        for c in range(children.shape[1]):
            child = children[cur, c]  # [B]
            safe = child.clamp(min=0)
            trying = descending & ~moved & (child >= 0)
            if present is not None:
                trying &= present[rows, safe]
            x = node_tokens[rows, safe].clamp(min=0)
            px = residual.gather(1, x[:, None]).squeeze(1)
            # u < r(x) / |r|, without dividing: the residual is renormalised implicitly.
            accept = trying & (uniforms[rows, safe] * residual.sum(dim=-1) < px)
            reject = trying & ~accept
            residual.scatter_(1, x[:, None], torch.where(reject, 0.0, px)[:, None])
            residual = torch.where(accept[:, None], probs[rows, safe].to(torch.float32), residual)
            cur = torch.where(accept, child, cur)
            accepted_nodes[:, d] = torch.where(accept, child, accepted_nodes[:, d])
            moved |= accept
        descending &= moved
    num_accepted = (accepted_nodes >= 0).sum(dim=1)
    accepted_tokens = torch.where(
        accepted_nodes >= 0,
        node_tokens.gather(1, accepted_nodes.clamp(min=0)),
        torch.full_like(accepted_nodes, -1),
    )
    bonus = sample_with_noise(residual, exponentials)
    return AcceptanceResult(num_accepted, accepted_nodes, accepted_tokens, cur, bonus)
