"""Longest-path acceptance over a verified token tree, for a batch of requests.

Inputs, for B requests and a tree of N nodes plus root (node order of :class:`TreeBuffers`):
  - ``node_tokens`` ``[B, N+1]``: the token at every node (column 0: the root, i.e. the token
    the base model produced at the previous step);
  - ``logits`` ``[B, N+1, V]``: the base model's logits at every node (the distribution of the
    token that follows that node).

A node is accepted when its token is acceptable under its parent's distribution and all its
ancestors are accepted. The deepest accepted node wins; the "bonus" token then comes from the
distribution at that node, so every step yields ``num_accepted + 1`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_medusa.core.tree import TreeBuffers

TYPICAL_EPSILON = 0.09  # posterior threshold (reference default)
TYPICAL_DELTA = 0.3  # posterior alpha (reference default)


@dataclass
class AcceptanceResult:
    """Per request: the accepted nodes (root excluded, root-to-leaf order) and the bonus token.

    - ``num_accepted`` ``[B]``: accepted draft nodes (0 .. depth);
    - ``accepted_nodes`` ``[B, D]``: their node indices, padded with -1;
    - ``accepted_tokens`` ``[B, D]``: their tokens, padded with -1;
    - ``last_node`` ``[B]``: the deepest accepted node (0 = root when nothing was accepted);
    - ``bonus_token`` ``[B]``: the token drawn from the distribution at ``last_node``.
    """

    num_accepted: torch.Tensor
    accepted_nodes: torch.Tensor
    accepted_tokens: torch.Tensor
    last_node: torch.Tensor
    bonus_token: torch.Tensor

    def output_tokens(self) -> list[list[int]]:
        """Tokens each request emits this step: accepted path then the bonus token."""
        out = []
        for i in range(self.num_accepted.shape[0]):
            n = int(self.num_accepted[i])
            out.append(self.accepted_tokens[i, :n].tolist() + [int(self.bonus_token[i])])
        return out


def longest_accepted_path(
    node_ok: torch.Tensor,
    node_tokens: torch.Tensor,
    tree: TreeBuffers,
    path_score: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Longest accepted prefix over all root-to-leaf paths.

    ``node_ok`` ``[B, N+1]``: node acceptable under its parent (the root column is ignored).
    ``path_score`` ``[B, N+1]`` (optional): per-node score; among equally long paths the
    one with the highest summed score over its accepted nodes wins. Otherwise the first wins.
    """
    b = node_ok.shape[0]
    paths = tree.leaf_paths  # [P, D+1]
    valid = paths >= 0
    safe = paths.clamp(min=0)
    ok = node_ok[:, safe] & valid  # [B, P, D+1]
    ok[:, :, 0] = True  # the root is always "accepted"
    prefix_ok = ok[:, :, 1:].long().cumprod(dim=-1)  # [B, P, D]
    lengths = prefix_ok.sum(dim=-1)  # [B, P]
    if path_score is None:
        best = lengths.argmax(dim=-1)  # first maximum
    else:
        node_scores = path_score[:, safe[:, 1:]]  # [B, P, D]
        scores = torch.where(prefix_ok.bool(), node_scores, 0.0).sum(dim=-1)  # [B, P]
        longest = lengths == lengths.max(dim=-1, keepdim=True).values
        scores = scores.masked_fill(~longest, float("-inf"))
        best = scores.argmax(dim=-1)
    num_accepted = lengths.gather(1, best[:, None]).squeeze(1)
    best_path = paths[best, 1:]  # [B, D]
    depth_idx = torch.arange(best_path.shape[1], device=best_path.device)
    keep = depth_idx[None, :] < num_accepted[:, None]
    accepted_nodes = torch.where(keep, best_path, torch.full_like(best_path, -1))
    rows = torch.arange(b, device=node_tokens.device)[:, None]
    accepted_tokens = torch.where(
        keep, node_tokens[rows, best_path.clamp(min=0)], torch.full_like(best_path, -1)
    )
    last_node = torch.where(
        num_accepted > 0,
        best_path.gather(1, (num_accepted - 1).clamp(min=0)[:, None]).squeeze(1),
        torch.zeros_like(num_accepted),
    )
    return num_accepted, accepted_nodes, accepted_tokens, last_node


def greedy_accept(
    node_tokens: torch.Tensor, logits: torch.Tensor, tree: TreeBuffers
) -> AcceptanceResult:
    """Greedy verification: a node is accepted when its token is the argmax at its parent.

    Lossless: the emitted tokens are exactly what greedy decoding would produce.
    """
    _check_shapes(node_tokens, logits, tree)
    argmax = logits.argmax(dim=-1)  # [B, N+1]
    parents = tree.parents.clamp(min=0)
    node_ok = node_tokens == argmax[:, parents]
    num_acc, nodes, tokens, last = longest_accepted_path(node_ok, node_tokens, tree)
    bonus = argmax.gather(1, last[:, None]).squeeze(1)
    return AcceptanceResult(num_acc, nodes, tokens, last, bonus)


def typical_accept(
    node_tokens: torch.Tensor,
    logits: torch.Tensor,
    tree: TreeBuffers,
    temperature: torch.Tensor | float,
    epsilon: float = TYPICAL_EPSILON,
    delta: float = TYPICAL_DELTA,
    generator: torch.Generator | None = None,
) -> AcceptanceResult:
    """Typical acceptance (Medusa paper, section 2.3.1).

    With ``p`` the base distribution at the parent (after temperature), node token ``x`` is
    accepted when ``p(x) > min(epsilon, delta * exp(-H(p)))``. Among the longest accepted
    paths the one with the highest summed log-probability wins. The bonus token is sampled
    from ``p`` at the last accepted node. Requests with temperature 0 are verified greedily.
    """
    _check_shapes(node_tokens, logits, tree)
    b = logits.shape[0]
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    if temp.dim() == 0:
        temp = temp.expand(b)
    elif temp.shape != (b,):
        raise ValueError(
            f"temperature must be a scalar or a [B] = [{b}] tensor, got {tuple(temp.shape)}"
        )
    is_greedy = temp <= 0
    safe_temp = torch.where(is_greedy, torch.ones_like(temp), temp)
    probs = torch.softmax(logits.float() / safe_temp[:, None, None], dim=-1)
    exponentials = torch.empty(probs.shape[0], probs.shape[2], device=probs.device)
    exponentials.exponential_(generator=generator)
    res = typical_accept_probs(node_tokens, probs, tree, epsilon, delta, exponentials)

    argmax = logits.argmax(dim=-1)
    parents = tree.parents.clamp(min=0)
    greedy_ok = node_tokens == argmax[:, parents]
    g_acc, g_nodes, g_tokens, g_last = longest_accepted_path(greedy_ok, node_tokens, tree)
    g_bonus = argmax.gather(1, g_last[:, None]).squeeze(1)
    pick = is_greedy[:, None]
    return AcceptanceResult(
        torch.where(is_greedy, g_acc, res.num_accepted),
        torch.where(pick, g_nodes, res.accepted_nodes),
        torch.where(pick, g_tokens, res.accepted_tokens),
        torch.where(is_greedy, g_last, res.last_node),
        torch.where(is_greedy, g_bonus, res.bonus_token),
    )


def typical_accept_probs(
    node_tokens: torch.Tensor,
    probs: torch.Tensor,
    tree: TreeBuffers,
    epsilon: torch.Tensor | float,
    delta: torch.Tensor | float,
    exponentials: torch.Tensor,
    present: torch.Tensor | None = None,
) -> AcceptanceResult:
    """Typical acceptance over already processed target distributions ``probs``
    ``[B, N+1, V]`` (temperature, top-k, top-p, ... applied; rows sum to 1).

    Node token ``x`` is accepted when ``p(x) > min(epsilon, delta * exp(-H(p)))`` with ``p``
    its parent's distribution; ``epsilon`` and ``delta`` are scalars or ``[B]``. Among the
    longest accepted paths the highest summed log-probability wins; the bonus token is
    ``argmax(p / E)`` at the last accepted node with ``exponentials`` ``[B, V]`` ``Exp(1)``
    noise (an exact draw from ``p``). ``present`` ``[B, N+1]`` bool (optional): the nodes
    each request drafted.
    """
    _check_shapes(node_tokens, probs, tree)
    b = probs.shape[0]
    device = probs.device
    eps = torch.as_tensor(epsilon, dtype=torch.float32, device=device).expand(b)
    dlt = torch.as_tensor(delta, dtype=torch.float32, device=device).expand(b)
    probs = probs.float()
    log_probs = probs.log()
    entropy = -(probs * log_probs).nan_to_num().sum(dim=-1)  # [B, N+1]
    threshold = torch.minimum(eps[:, None], dlt[:, None] * torch.exp(-entropy))
    parents = tree.parents.clamp(min=0)
    tokens = node_tokens.clamp(min=0)
    child_logp = log_probs[:, parents].gather(2, tokens[:, :, None]).squeeze(2)  # [B, N+1]
    node_ok = child_logp.exp() > threshold[:, parents]
    if present is not None:
        node_ok &= present
    num_acc, nodes, acc_tokens, last = longest_accepted_path(
        node_ok, node_tokens, tree, child_logp.nan_to_num(neginf=-1e30)
    )
    last_probs = probs[torch.arange(b, device=device), last]  # [B, V]
    bonus = sample_with_noise(last_probs, exponentials)
    return AcceptanceResult(num_acc, nodes, acc_tokens, last, bonus)


def sample_with_noise(weights: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """``[R, V]`` (unnormalised) weights -> ``[R]`` tokens, an exact draw given ``Exp(1)``
    noise ``[R, V]``: ``argmax(w / E)`` picks ``v`` with probability ``w(v) / sum(w)``."""
    return (weights / exponentials).argmax(dim=-1)


def _check_shapes(node_tokens: torch.Tensor, logits: torch.Tensor, tree: TreeBuffers) -> None:
    n = tree.parents.shape[0]
    if node_tokens.dim() != 2 or node_tokens.shape[1] != n:
        raise ValueError(f"node_tokens must be [B, {n}], got {tuple(node_tokens.shape)}")
    if logits.dim() != 3 or logits.shape[:2] != node_tokens.shape:
        raise ValueError(
            f"logits must be [B, {n}, V] matching node_tokens, got {tuple(logits.shape)}"
        )
