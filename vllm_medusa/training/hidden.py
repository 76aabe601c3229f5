"""Last hidden states of the frozen base model, computed once and cached on disk.

The hidden state kept for position ``t`` is the input of the base LM head (after the final
norm): the decoder's ``last_hidden_state``, checked against the LM head's logits on the
first batch. Medusa head ``i`` at position ``t`` is trained to predict token ``t + 2 + i``.

Which positions are kept: with the default ``include_prompt=False`` the positions whose
*next* token (the base model's prediction) is an answer token, i.e. ``t`` in
``[P - 1, T - 2]`` for a prompt of ``P`` tokens and a conversation of ``T``; with
``include_prompt`` every position ``[0, T - 2]``. Rows whose head-0 target falls past the end
are still kept (evaluation walks every position); their targets are ignored (-100).

Cache file (safetensors): ``hidden`` ``[N, H]`` (fp16, or fp32 when fp16 would overflow),
``tokens`` ``[M]`` (all conversations concatenated), ``pos`` ``[N]`` (index in ``tokens`` of
each row's position), ``seq_end`` ``[N]`` (end, exclusive, of the row's conversation in
``tokens``), ``conv`` ``[N]`` (conversation number); metadata ``key`` identifies the inputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_medusa.training.common import TrainingError
from vllm_medusa.training.conversations import Conversation

IGNORE = -100


@dataclass
class HiddenCache:
    hidden: torch.Tensor  # [N, H]
    tokens: torch.Tensor  # [M] long
    pos: torch.Tensor  # [N] long
    seq_end: torch.Tensor  # [N] long
    conv: torch.Tensor  # [N] long

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[1]

    def targets(self, num_heads: int) -> torch.Tensor:
        """``[N, K]``: token ``pos + 2 + i`` for head ``i``, or -100 past the conversation."""
        offs = torch.arange(2, 2 + num_heads)
        idx = self.pos[:, None] + offs[None, :]
        valid = idx < self.seq_end[:, None]
        tok = self.tokens[idx.clamp(max=self.tokens.numel() - 1)]
        return torch.where(valid, tok, torch.full_like(tok, IGNORE))

    def save(self, path: str | Path, key: str) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {
                "hidden": self.hidden.contiguous(),
                "tokens": self.tokens,
                "pos": self.pos,
                "seq_end": self.seq_end,
                "conv": self.conv,
            },
            str(tmp),
            metadata={"key": key},
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> HiddenCache | None:
        """The cache at ``path``, or None when missing or made from other inputs."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            if key is not None and (f.metadata() or {}).get("key") != key:
                return None
            t = {name: f.get_tensor(name) for name in f.keys()}
        return cls(t["hidden"], t["tokens"], t["pos"], t["seq_end"], t["conv"])


def cache_key(conversations_file: Path, model_path: Path, include_prompt: bool) -> str:
    """Identifies a cache's inputs: the data file's bytes, the model's weights, the mode."""
    h = hashlib.sha256()
    with open(conversations_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    weights = sorted(Path(model_path).glob("*.safetensors"))
    model_id = [(w.name, w.stat().st_size, int(w.stat().st_mtime)) for w in weights]
    h.update(json.dumps([str(Path(model_path).resolve()), model_id, include_prompt]).encode())
    return h.hexdigest()


def _check_lm_head_input(model, ids: torch.Tensor, hidden: torch.Tensor) -> None:
    """The cached state must be exactly what feeds the LM head."""
    n = min(ids.shape[1], 16)
    with torch.no_grad():
        ref = model(input_ids=ids[:1, :n]).logits[0]
        ours = model.get_output_embeddings()(hidden[:1, :n])[0]
    if not torch.allclose(ref, ours, atol=1e-3, rtol=1e-3):
        raise TrainingError(
            "the decoder's last hidden state does not reproduce the model's logits: "
            f"max difference {(ref - ours).abs().max():.3g}; unsupported architecture"
        )


@torch.no_grad()
def compute_hidden(
    model,
    conversations: list[Conversation],
    *,
    include_prompt: bool = False,
    batch_tokens: int = 4096,
    progress: bool = True,
    fp16: bool = True,
) -> HiddenCache:
    """Run every conversation through the frozen base model (right-padded batches of
    similar lengths) and keep the last hidden state at the training positions."""
    from tqdm import tqdm

    convs = [c for c in conversations if len(c.answer_ids) >= 1 and len(c.prompt_ids) >= 1]
    if not convs:
        raise TrainingError("no conversation with both a prompt and an answer")
    seqs = [c.prompt_ids + c.answer_ids for c in convs]
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s))
    tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    order = sorted(range(len(convs)), key=lambda i: -len(seqs[i]))
    rows: dict[int, tuple[torch.Tensor, int]] = {}
    total = sum(len(s) for s in seqs)
    bar = tqdm(total=total, desc="hidden states", unit="tok", disable=not progress)
    checked = False
    t0 = time.time()
    i = 0
    while i < len(order):
        longest = len(seqs[order[i]])
        n = max(1, batch_tokens // longest)
        batch = order[i : i + n]
        i += n
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for r, ci in enumerate(batch):
            ids[r, : len(seqs[ci])] = torch.tensor(seqs[ci])
            mask[r, : len(seqs[ci])] = 1
        out = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if not checked:
            _check_lm_head_input(model, ids, out)
            checked = True
        for r, ci in enumerate(batch):
            first = 0 if include_prompt else len(convs[ci].prompt_ids) - 1
            last = len(seqs[ci]) - 2  # the last position whose next token exists
            rows[ci] = (out[r, first : last + 1].clone(), first)
        bar.update(sum(len(seqs[ci]) for ci in batch))
        bar.set_postfix(tok_s=f"{bar.n / max(time.time() - t0, 1e-6):.0f}")
    bar.close()
    hidden, pos, seq_end, conv = [], [], [], []
    for ci in range(len(convs)):
        h, first = rows[ci]
        hidden.append(h)
        pos.append(starts[ci] + first + torch.arange(h.shape[0]))
        seq_end.append(torch.full((h.shape[0],), starts[ci + 1]))
        conv.append(torch.full((h.shape[0],), ci))
    hid = torch.cat(hidden)
    if fp16 and hid.abs().max() < 6e4:
        hid = hid.half()
    return HiddenCache(hid, tokens, torch.cat(pos), torch.cat(seq_end), torch.cat(conv))


def cached_hidden(
    conversations_file: str | Path,
    model,
    model_path: Path,
    *,
    cache_path: str | Path | None = None,
    include_prompt: bool = False,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> HiddenCache:
    """The hidden states of a distillation file, from ``cache_path`` (default: beside the
    file) when made from the same inputs, else computed and saved there."""
    from vllm_medusa.training.conversations import read_conversations

    conversations_file = Path(conversations_file)
    suffix = ".hidden-prompt.safetensors" if include_prompt else ".hidden.safetensors"
    cache_path = Path(cache_path) if cache_path else conversations_file.with_suffix(suffix)
    key = cache_key(conversations_file, model_path, include_prompt)
    cache = HiddenCache.load(cache_path, key)
    if cache is not None:
        print(f"hidden states: {cache.num_rows} positions from {cache_path}", flush=True)
        return cache
    conversations = read_conversations(conversations_file)
    t0 = time.time()
    cache = compute_hidden(
        model,
        conversations,
        include_prompt=include_prompt,
        batch_tokens=batch_tokens,
        progress=progress,
    )
    cache.save(cache_path, key)
    print(
        f"hidden states: {cache.num_rows} positions of {len(conversations)} conversations "
        f"computed in {time.time() - t0:.0f} s, cached in {cache_path}",
        flush=True,
    )
    return cache
