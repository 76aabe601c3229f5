"""Heads that are deliberately perfect for fixed texts.

They memorise the base model's own greedy continuation of a few prompts, so greedy tree
verification accepts whole paths on those prompts: this exercises deep acceptance, KV
compaction and stops inside an accepted path, independently of how good trained heads are.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_medusa.core.checkpoint import save_heads
from vllm_medusa.core.heads import MedusaConfig, MedusaHeads


def _greedy_states(model_dir: Path, prompts: list[str], max_new_tokens: int):
    """Per prompt: the greedy sequence (prompt + continuation), its last hidden states and
    the prompt length; plus the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0]
            hidden = model(full[None], output_hidden_states=True).hidden_states[-1][0]
        out.append((full, hidden, ids.shape[1]))
    return out, model


def fit_oracle_sequential_heads(
    model_dir: Path,
    prompts: list[str],
    out_dir: Path,
    *,
    max_new_tokens: int = 48,
    num_heads: int = 4,
    max_steps: int = 800,
    rank: int = 0,
) -> Path:
    """Sequential heads that know the greedy continuation: head d, reading the true path,
    ranks the next token of the continuation ``rank``-th (0: top-1; see
    :func:`_demote_true_tokens`)."""
    from vllm_medusa.core.sequential_heads import (
        SequentialConfig,
        SequentialHeads,
        save_sequential_heads,
    )

    torch.manual_seed(0)
    seqs, model = _greedy_states(model_dir, prompts, max_new_tokens)
    states, paths, labels = [], [], []
    for full, hidden, p in seqs:
        n = full.shape[0]
        for t in range(p - 1, n - 1):
            states.append(hidden[t])
            paths.append([full[t + 1 + d].item() if t + 1 + d < n else 0 for d in range(num_heads)])
            labels.append(
                [full[t + 2 + d].item() if t + 2 + d < n else -100 for d in range(num_heads)]
            )
    x, path, y = torch.stack(states), torch.tensor(paths), torch.tensor(labels)
    lm_head = model.lm_head.weight.detach()
    embed = model.get_input_embeddings().weight.detach()
    vocab = torch.unique(torch.cat([y[y >= 0], path.reshape(-1)]))
    remap = torch.full((lm_head.shape[0],), -100, dtype=torch.long)
    remap[vocab] = torch.arange(vocab.numel())
    y_draft = torch.where(y >= 0, remap[y.clamp(min=0)], -100)
    config = SequentialConfig(
        hidden_size=x.shape[1],
        vocab_size=lm_head.shape[0],
        num_heads=num_heads,
        draft_vocab_size=int(vocab.numel()),
    )
    heads = SequentialHeads(config, vocab)
    heads.init_draft_lm_head(lm_head)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for step in range(max_steps):
        logits = heads.draft_logits(heads.path_states(x, embed[path]))  # [K, N, V']
        loss = sum(
            F.cross_entropy(logits[d], y_draft[:, d], ignore_index=-100) for d in range(num_heads)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            pred = logits.detach().argmax(-1).t()
            if bool(((pred == y_draft) | (y_draft == -100)).all()):
                break
    else:
        raise RuntimeError("oracle sequential heads did not memorise the continuation")
    if rank:
        heads = _demote_true_tokens(heads, x, embed[path], y, rank)
    save_sequential_heads(heads, out_dir)
    return out_dir


def _demote_true_tokens(heads, x, path_emb, labels, rank: int, margin: float = 0.3):
    """Oracle heads whose top-1 is the true token -> heads that rank it ``rank``-th: each
    draft-vocabulary token ``t`` gets ``rank`` decoys (unused full ids) with draft LM head
    rows ``(1 + j * eps) D[t]``, j = 1..rank, which outscore ``t`` wherever ``t`` is the top
    (positive) logit. Checked with ``margin`` at every labelled position (vLLM's states differ
    slightly from these): decoys of ``t``, then ``t``, then everything else."""
    from vllm_medusa.core.sequential_heads import SequentialConfig, SequentialHeads

    with torch.no_grad():
        logits = heads.draft_logits(heads.path_states(x, path_emb))  # [K, N, V']
        valid = (labels >= 0).t()  # [K, N]
        top2 = logits.topk(2, dim=-1).values[valid]  # [M, 2]
        eps = 2 * margin / float(top2[:, 0].min())
        if not (
            top2[:, 0].min() > 0 and ((1 + rank * eps) * top2[:, 1] + margin < top2[:, 0]).all()
        ):
            raise RuntimeError("oracle heads' margins leave no room for decoys")
        old_ids, d = heads.draft_token_ids.cpu(), heads.draft_lm_head.detach()
        used = torch.zeros(heads.config.vocab_size, dtype=torch.bool)
        used[old_ids] = True
        free = torch.nonzero(~used[1000:])[:, 0] + 1000  # ordinary tokens, past the specials
        ids = [old_ids] + [free[j * len(old_ids) : (j + 1) * len(old_ids)] for j in range(rank)]
        rows = [d] + [(1 + (j + 1) * eps) * d for j in range(rank)]
        ids, rows = torch.cat(ids), torch.cat(rows)
        order = ids.argsort()
        config = SequentialConfig(
            **{**heads.config.to_dict(), "draft_vocab_size": int(ids.numel())}
        )
        ranked = SequentialHeads(config, ids[order])
        for name in ("in_proj_weight", "in_proj_bias", "block_weight", "block_bias"):
            getattr(ranked, name).copy_(getattr(heads, name))
        ranked.draft_lm_head.copy_(rows[order])
        # Check: at every labelled position the top rank + 1 full ids are the true token's
        # decoys (highest multiplier first), then the true token, each ahead by margin.
        top = ranked.draft_logits(ranked.path_states(x, path_emb)).topk(rank + 2, dim=-1)
        got = ranked.to_full_ids(top.indices)[valid]  # [M, rank + 2]
        true = labels.t()[valid]  # [M] full ids
        slot = torch.searchsorted(old_ids, true)
        want = torch.stack(
            [free[j * len(old_ids) + slot] for j in reversed(range(rank))] + [true], 1
        )
        gaps = top.values[valid][:, :-1] - top.values[valid][:, 1:]
        if not (torch.equal(got[:, : rank + 1], want) and bool((gaps > margin).all())):
            raise RuntimeError("demoted oracle heads do not rank the true tokens as wanted")
    return ranked


def fit_oracle_heads(
    model_dir: Path,
    prompts: list[str],
    out_dir: Path,
    *,
    max_new_tokens: int = 48,
    num_heads: int = 4,
    max_steps: int = 600,
) -> Path:
    torch.manual_seed(0)
    seqs, model = _greedy_states(model_dir, prompts, max_new_tokens)
    states, targets = [], []
    for full, hidden, p in seqs:
        n = full.shape[0]
        for t in range(p - 1, n - 1):
            states.append(hidden[t])
            targets.append(
                [full[t + 2 + i].item() if t + 2 + i < n else -100 for i in range(num_heads)]
            )
    x, y = torch.stack(states), torch.tensor(targets)
    lm_head = model.lm_head.weight.detach()
    config = MedusaConfig(
        hidden_size=x.shape[1],
        vocab_size=lm_head.shape[0],
        num_heads=num_heads,
        num_layers=1,
        shared_lm_head=True,
    )
    heads = MedusaHeads(config)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for step in range(max_steps):
        logits = heads.logits(x, lm_head)
        loss = sum(F.cross_entropy(logits[i], y[:, i], ignore_index=-100) for i in range(num_heads))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            with torch.no_grad():
                pred = heads.logits(x, lm_head).argmax(-1).t()  # [N, K]
            if bool(((pred == y) | (y == -100)).all()):
                break
    else:
        raise RuntimeError("oracle heads did not memorise the continuation")
    save_heads(heads, out_dir)
    return out_dir
