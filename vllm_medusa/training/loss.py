"""Full-vocabulary cross-entropy of the Medusa heads, fused and chunked.

The gradient of the cross-entropy with respect to the logits is ``softmax - onehot``, so one
pass per chunk of rows computes the logits (one matmul), turns them into the softmax in
place, and maps that gradient back to the head states (a second matmul) and, for heads with
their own LM head, to the LM-head weight (a third). Nothing ``[rows, V]``-sized outlives its
chunk, and autograd never sees the vocabulary-sized tensors: the caller backpropagates the
returned gradient of the head states through the residual blocks.

The loss is exact (full vocabulary). ``vocab`` (optional) restricts the softmax to a subset
of token ids, for the shared-LM-head variant only as a training-time approximation:
inference always uses the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_medusa.training.hidden import IGNORE


@dataclass
class HeadLossOutput:
    loss: torch.Tensor  # scalar: sum over heads of weight_i * mean CE_i
    per_head_loss: torch.Tensor  # [K] mean CE of each head (0 when it has no target)
    grad_states: torch.Tensor  # [K, N, H] d loss / d head states
    grad_lm_head: torch.Tensor | None  # [K, V, H] for heads with their own LM head
    correct: torch.Tensor  # [K] top-1 hits
    count: torch.Tensor  # [K] rows with a target


@torch.no_grad()
def fused_head_loss(
    states: torch.Tensor,
    lm_head: torch.Tensor,
    targets: torch.Tensor,
    head_weights: torch.Tensor | None = None,
    *,
    chunk_rows: int = 1024,
    want_lm_grad: bool = False,
) -> HeadLossOutput:
    """Loss and gradients for head states ``[K, N, H]``.

    ``lm_head`` is ``[V, H]`` (shared by every head) or ``[K, V, H]`` (one per head);
    ``targets`` ``[K, N]`` token ids (``-100`` = ignored, or ids into ``lm_head``'s rows).
    """
    k, n, h = states.shape
    shared = lm_head.dim() == 2
    if targets.shape != (k, n):
        raise ValueError(f"targets must be [{k}, {n}], got {tuple(targets.shape)}")
    weights = (
        torch.ones(k, dtype=states.dtype)
        if head_weights is None
        else torch.as_tensor(head_weights, dtype=states.dtype)
    )
    valid = targets != IGNORE
    count = valid.sum(dim=1)
    scale = weights / count.clamp(min=1).to(states.dtype)  # [K]
    grad_states = torch.empty_like(states)
    grad_lm = torch.zeros_like(lm_head) if want_lm_grad else None
    loss_sum = torch.zeros(k, dtype=torch.float64)
    correct = torch.zeros(k, dtype=torch.long)
    for head in range(k):
        w = lm_head if shared else lm_head[head]
        for start in range(0, n, chunk_rows):
            s = states[head, start : start + chunk_rows]
            tgt = targets[head, start : start + chunk_rows]
            ok = tgt != IGNORE
            safe_tgt = tgt.clamp(min=0)
            logits = s @ w.t()  # [c, V]
            rows = torch.arange(logits.shape[0])
            target_logit = logits[rows, safe_tgt]
            top = logits.max(dim=1)
            correct[head] += ((top.indices == safe_tgt) & ok).sum()
            logits.sub_(top.values[:, None]).exp_()
            denom = logits.sum(dim=1)
            lse = denom.log() + top.values
            loss_sum[head] += ((lse - target_logit) * ok).sum().double()
            # softmax - onehot, scaled, zero on ignored rows
            logits.mul_((scale[head] * ok / denom)[:, None])
            logits[rows, safe_tgt] -= scale[head] * ok
            grad_states[head, start : start + chunk_rows] = logits @ w
            if grad_lm is not None:
                if shared:
                    grad_lm.addmm_(logits.t(), s)
                else:
                    grad_lm[head].addmm_(logits.t(), s)
    per_head = (loss_sum / count.clamp(min=1).double()).to(states.dtype)
    return HeadLossOutput(
        loss=(per_head * weights).sum(),
        per_head_loss=per_head,
        grad_states=grad_states,
        grad_lm_head=grad_lm,
        correct=correct,
        count=count,
    )
