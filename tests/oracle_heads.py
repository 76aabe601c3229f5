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
