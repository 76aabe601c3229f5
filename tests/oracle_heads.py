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


def fit_oracle_heads(
    model_dir: Path,
    prompts: list[str],
    out_dir: Path,
    *,
    max_new_tokens: int = 48,
    num_heads: int = 4,
    max_steps: int = 600,
) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    states, targets = [], []
    for prompt in prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0]
            hidden = model(full[None], output_hidden_states=True).hidden_states[-1][0]
        n = full.shape[0]
        for t in range(ids.shape[1] - 1, n - 1):
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
