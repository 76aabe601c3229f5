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


def _medusa_examples(seqs, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``[N, H]`` at every continuation position and the tokens each Medusa-1
    head must predict there ``[N, K]`` (token t + 2 + i; -100 past the continuation)."""
    states, targets = [], []
    for full, hidden, p in seqs:
        n = full.shape[0]
        for t in range(p - 1, n - 1):
            states.append(hidden[t])
            targets.append(
                [full[t + 2 + i].item() if t + 2 + i < n else -100 for i in range(num_heads)]
            )
    return torch.stack(states), torch.tensor(targets)


def fit_oracle_sequential_heads(
    model_dir: Path,
    prompts: list[str],
    out_dir: Path,
    *,
    max_new_tokens: int = 48,
    num_heads: int = 4,
    max_steps: int = 800,
) -> Path:
    """Sequential heads that know the greedy continuation: head d, reading the true path,
    predicts the next token of the continuation."""
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
    save_sequential_heads(heads, out_dir)
    return out_dir


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
    x, y = _medusa_examples(seqs, num_heads)
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


def demote_true_tokens(
    oracle_dir: Path,
    model_dir: Path,
    prompts: list[str],
    out_dir: Path,
    *,
    rank: int = 2,
    max_new_tokens: int = 48,
    margin: float = 0.3,
) -> Path:
    """Medusa-1 oracle heads (top-1 = the true token) -> heads that rank the true token
    ``rank``-th at every head, below ``rank`` decoys: each head gets its own LM head (the base
    one's rows) where every token ``t`` of the continuations has decoys (unused ordinary ids)
    with rows ``(1 + j * eps) W[t]``, j = 1..rank, which outscore ``t`` wherever ``t`` is the
    top, positive logit. No training; checked with ``margin`` at every labelled position (vLLM's
    states differ slightly from these): decoys of the true token, then the true token."""
    from vllm_medusa.core.checkpoint import load_heads

    seqs, model = _greedy_states(model_dir, prompts, max_new_tokens)
    oracle = load_heads(oracle_dir)
    num_heads = oracle.num_heads
    x, y = _medusa_examples(seqs, num_heads)  # [N, H], [N, K]
    lm_head = model.lm_head.weight.detach()  # [V, H]
    valid = (y >= 0).t()  # [K, N]
    with torch.no_grad():
        logits = oracle.logits(x, lm_head)  # [K, N, V]
        top2 = logits.topk(2, dim=-1)
        assert torch.equal(top2.indices[..., 0][valid], y.t()[valid]), "not an oracle"
        z_top, z_2nd = top2.values[..., 0][valid], top2.values[..., 1][valid]
        eps = 2 * margin / float(z_top.min())
        room = (1 + rank * eps) * z_2nd.clamp(min=0) + margin < z_top
        if not (z_top.min() > 0 and bool(room.all())):
            raise RuntimeError(f"oracle margins leave no room for decoys ({int((~room).sum())})")
        used = torch.unique(y[y >= 0])
        is_used = torch.zeros(lm_head.shape[0], dtype=torch.bool)
        is_used[used] = True
        free = torch.nonzero(~is_used[1000:])[:, 0] + 1000  # ordinary tokens, past specials
        decoys = free[: rank * len(used)].view(rank, len(used))  # decoys[j - 1]: multiplier j
        own = lm_head.clone()
        for j in range(1, rank + 1):
            own[decoys[j - 1]] = (1 + j * eps) * lm_head[used]
        config = MedusaConfig(**{**oracle.config.to_dict(), "shared_lm_head": False})
        heads = MedusaHeads(config)
        heads.load_state_dict(
            {**oracle.state_dict(), "lm_head_weight": own.expand(num_heads, -1, -1)}
        )
        top = heads.compute_logits(heads(x)).topk(rank + 2, dim=-1)  # [K, N, rank + 2]
        slot = torch.searchsorted(used, y.clamp(min=0))  # [N, K]
        want = [decoys[j - 1][slot].t() for j in range(rank, 0, -1)] + [y.t()]
        want = torch.stack(want, dim=-1)[valid]  # [M, rank + 1]
        gaps = (top.values[..., :-1] - top.values[..., 1:])[valid]
        if not (torch.equal(top.indices[..., : rank + 1][valid], want) and (gaps > margin).all()):
            raise RuntimeError("demoted oracle heads do not rank the true tokens as wanted")
    save_heads(heads, out_dir)
    return out_dir
