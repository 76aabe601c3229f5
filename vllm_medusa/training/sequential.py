"""``vllm-medusa train-sequential``: sequential (Hydra-style) heads on teacher-forced data.

Data: a ``teacher-force`` folder (hidden states ``h_t`` at answer positions, the text's
tokens, and the base model's greedy next token at every answer position). For row ``t`` and
depth ``d`` (head ``d``):

    path token  x_{t+1+d}                (the text; d = 0 is the bonus token)
    label       argmax p(. | x_<=t+1+d)  (what the base model would say next)

so head ``d`` learns to continue the path with the base model's own choice, which is what
greedy tree verification accepts. Loss: cross-entropy over the draft vocabulary (the
``--draft-vocab`` most frequent labels; labels outside it are left out of the loss and
counted as misses), summed over heads, backpropagated through the recurrence (head ``d``
reads head ``d - 1``'s state). ``--greedy-path-only`` keeps depth ``d`` of a row only when
every path token before it equals the base model's greedy choice (the exact serving
distribution, at the price of data). AdamW, warm-up + cosine; matmuls in bfloat16 autocast
(parameters and optimizer in fp32).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_medusa.core.sequential_heads import (
    SequentialConfig,
    SequentialHeads,
    draft_vocab_coverage,
    frequent_draft_vocab,
)
from vllm_medusa.training.common import TrainingError
from vllm_medusa.training.hidden import IGNORE, HiddenCache
from vllm_medusa.training.train import batch_indices, lr_at

METRICS_FILE = "train_metrics.json"
COVERAGE_SIZES = [1024, 2048, 4096, 8192, 16384, 32768]
QUICK = {"epochs": 1.0, "batch_rows": 64, "draft_vocab": 512}


@dataclass
class SequentialTrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    draft_vocab: int = 8192
    epochs: float = 2.0
    batch_rows: int = 2048
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    greedy_path_only: bool = False
    bf16: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.num_heads < 1 or self.num_layers < 0 or self.draft_vocab < 2:
            raise TrainingError("--num-heads >= 1, --num-layers >= 0, --draft-vocab >= 2")
        if self.epochs <= 0 or self.batch_rows < 1 or self.lr <= 0:
            raise TrainingError("--epochs, --batch-rows and --lr must be positive")


def path_positions(cache: HiddenCache, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx`` ``[N, K]``: position of path token ``d`` of every row (``t + 1 + d``), and
    ``path`` ``[N, K]``: its token id (0 past the conversation's end)."""
    idx = cache.pos[:, None] + torch.arange(1, num_heads + 1)[None, :]
    last = cache.tokens.numel() - 1
    path = torch.where(idx < cache.seq_end[:, None], cache.tokens[idx.clamp(max=last)], 0)
    return idx, path


def path_examples(cache: HiddenCache, num_heads: int, greedy_path_only: bool):
    """``path`` ``[N, K]`` (token ids, 0 where past the end) and ``labels`` ``[N, K]`` (full
    ids, -100 where there is none) for every cached row."""
    idx, path = path_positions(cache, num_heads)
    last = cache.tokens.numel() - 1
    # The greedy label after the conversation's last token is not an answer token.
    has_label = idx < (cache.seq_end[:, None] - 1)
    labels = cache.next_token[idx.clamp(max=last)]
    ok = has_label & (labels >= 0)
    if greedy_path_only:
        # path token d equals the base model's greedy choice at the position before it
        greedy = cache.tokens[idx.clamp(max=last)] == cache.next_token[(idx - 1).clamp(max=last)]
        ok &= greedy.cumprod(dim=1).bool()
    return path, torch.where(ok, labels, IGNORE)


@dataclass
class SequentialTrainResult:
    heads: SequentialHeads
    steps: int
    seconds: float
    history: list[dict]
    coverage: dict


def train_sequential(
    cache: HiddenCache,
    base_lm_head: torch.Tensor,
    embed_weight: torch.Tensor,
    cfg: SequentialTrainConfig,
    *,
    progress: bool = True,
    base_model_name: str | None = None,
) -> SequentialTrainResult:
    """Train sequential heads; the base LM head and embedding ``[V, H]`` stay frozen."""
    from tqdm import tqdm

    cfg.validate()
    if getattr(cache, "next_token", None) is None:
        raise TrainingError("the training data has no greedy labels (use teacher-force data)")
    torch.manual_seed(cfg.seed)
    vocab_size, hidden_size = base_lm_head.shape
    if cache.hidden_size != hidden_size:
        raise TrainingError(
            f"hidden states have size {cache.hidden_size}, the base model {hidden_size}"
        )
    path, labels = path_examples(cache, cfg.num_heads, cfg.greedy_path_only)
    vocab_ids = frequent_draft_vocab(labels[labels >= 0], cfg.draft_vocab, vocab_size)
    coverage = draft_vocab_coverage(labels, COVERAGE_SIZES, vocab_size)
    remap = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    remap[vocab_ids] = torch.arange(vocab_ids.numel())
    draft_labels = torch.where(labels >= 0, remap[labels.clamp(min=0)], IGNORE)  # [N, K]
    has_label = labels >= 0
    rows = has_label.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        raise TrainingError("no training row has a label (answers too short?)")

    config = SequentialConfig(
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        num_heads=cfg.num_heads,
        draft_vocab_size=int(vocab_ids.numel()),
        num_layers=cfg.num_layers,
        base_model_name_or_path=base_model_name,
    )
    heads = SequentialHeads(config, vocab_ids)
    heads.init_draft_lm_head(base_lm_head.float())
    embed_weight = embed_weight.float()
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(rows.numel() / cfg.batch_rows)
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    history, ema = [], None
    bar = tqdm(total=total, desc="train-sequential", unit="step", disable=not progress)
    t0 = time.time()
    for step in range(total):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if in_epoch == 0:
            batches = batch_indices(rows.numel(), cfg.batch_rows, epoch, cfg.seed)
        idx = rows[batches[in_epoch]]
        lr = lr_at(step, total, cfg.lr, cfg.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        target = draft_labels[idx].t()  # [K, B]
        counted = has_label[idx].t()  # labels outside the draft vocabulary count as misses
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            states = heads.path_states(cache.hidden[idx].float(), embed_weight[path[idx]])
            logits = heads.draft_logits(states).float()  # [K, B, V']
        per_head = torch.stack(
            [
                F.cross_entropy(logits[d], target[d], ignore_index=IGNORE)
                for d in range(cfg.num_heads)
            ]
        )
        per_head = torch.nan_to_num(per_head)  # a head with no label in the batch
        loss = per_head.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            hit = (logits.argmax(-1) == target) & counted
            acc = (hit.sum(1).double() / counted.sum(1).clamp(min=1).double()).tolist()
        ema = acc if ema is None else [0.98 * e + 0.02 * a for e, a in zip(ema, acc, strict=True)]
        history.append(
            {
                "step": step + 1,
                "lr": lr,
                "loss": round(loss.item(), 4),
                "top1": [round(a, 4) for a in acc],
            }
        )
        bar.update(1)
        bar.set_postfix_str(f"loss {loss.item():.3f} top1 " + "/".join(f"{a:.3f}" for a in ema))
    bar.close()
    return SequentialTrainResult(heads, total, time.time() - t0, history, coverage)


# ---- evaluation: conditional candidates on the true path ---------------------------------


@torch.no_grad()
def sequential_candidates(
    heads: SequentialHeads,
    cache: HiddenCache,
    embed_weight: torch.Tensor,
    *,
    max_rank: int = 10,
    chunk_rows: int = 1024,
    progress: bool = True,
):
    """Top-``max_rank`` of every head at every cached position, head ``d`` reading the
    *true* path (the base model's greedy continuation): exactly what greedy verification
    sees whenever the path so far was accepted. Returns :class:`.evaluate.Candidates`."""
    from tqdm import tqdm

    from vllm_medusa.training.evaluate import Candidates

    k = heads.num_heads
    _, path = path_positions(cache, k)
    out = torch.empty(cache.num_rows, k, max_rank, dtype=torch.long)
    emb = embed_weight.float()
    for start in tqdm(
        range(0, cache.num_rows, chunk_rows), desc="heads top-k", disable=not progress
    ):
        sl = slice(start, start + chunk_rows)
        states = heads.path_states(cache.hidden[sl].float(), emb[path[sl]])  # [K, n, H]
        top = heads.draft_logits(states).topk(max_rank, dim=-1).indices  # [K, n, R]
        out[sl] = heads.to_full_ids(top).permute(1, 0, 2)
    return Candidates(out, cache.targets(k), cache.conv.clone())


@torch.no_grad()
def sequential_step_ms(heads: SequentialHeads, tree, embed_weight, batch_sizes=(1, 8), repeats=20):
    """Median wall time (ms) of filling ``tree`` with these heads, per batch size."""
    from vllm_medusa.core.sequential_heads import SequentialTreePlan

    plan = SequentialTreePlan.build(tree)
    emb = embed_weight.float()

    def embed(ids):
        return emb[ids]

    out = {}
    for b in batch_sizes:
        hidden = torch.randn(b, heads.config.hidden_size)
        bonus = torch.zeros(b, dtype=torch.long)
        heads.fill_tree(plan, hidden, bonus, embed)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            heads.fill_tree(plan, hidden, bonus, embed)
            times.append((time.perf_counter() - t) * 1e3)
        out[f"batch_{b}"] = round(sorted(times)[len(times) // 2], 3)
    return out


# ---- CLI ---------------------------------------------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="teacher-force folder")
    p.add_argument("--output", required=True, help="heads folder")
    p.add_argument("--model", help="base model folder (default: the prepared SmolLM2-135M)")
    p.add_argument("--max-tokens", type=int, help="use only the first N answer tokens of data")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-rows", type=int, default=2048, help="positions per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--greedy-path-only", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="tiny run for tests")


def run(args: argparse.Namespace) -> int:
    from vllm_medusa.training.common import run_guarded

    return run_guarded("train-sequential", _run, args)


def _run(args: argparse.Namespace) -> int:
    from vllm_medusa.core.sequential_heads import save_sequential_heads
    from vllm_medusa.training.common import (
        base_lm_head_weight,
        load_base_model,
        resolve_model,
        set_threads,
        write_json,
    )
    from vllm_medusa.training.teacher import load_teacher_data

    set_threads(args.threads)
    cfg = SequentialTrainConfig(
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        draft_vocab=QUICK["draft_vocab"] if args.quick else args.draft_vocab,
        epochs=QUICK["epochs"] if args.quick else args.epochs,
        batch_rows=QUICK["batch_rows"] if args.quick else args.batch_rows,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        greedy_path_only=args.greedy_path_only,
        bf16=not args.fp32,
        seed=args.seed,
    )
    cfg.validate()
    model_path = resolve_model(args.model)
    model, _ = load_base_model(model_path)
    cache = load_teacher_data(args.data, args.max_tokens)
    tokens = int((cache.next_token >= 0).sum())
    print(f"train-sequential: {cache.num_rows} positions ({tokens} labelled tokens)", flush=True)
    result = train_sequential(
        cache,
        base_lm_head_weight(model),
        model.get_input_embeddings().weight.detach(),
        cfg,
        base_model_name=model_path.name,
    )
    last = result.history[-min(50, len(result.history)) :]
    top1 = [round(sum(h["top1"][i] for h in last) / len(last), 4) for i in range(cfg.num_heads)]
    recipe = {
        "data": Path(args.data).name,
        "positions": int(cache.num_rows),
        "max_tokens": args.max_tokens,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "train_top1_last_steps": top1,
        "draft_vocab_coverage": result.coverage,
    } | asdict(cfg)
    result.heads.config.extra = {"training": recipe}
    save_sequential_heads(result.heads, args.output, weights_dtype=torch.float16)
    write_json(Path(args.output) / METRICS_FILE, {"recipe": recipe, "history": result.history})
    print(
        f"train-sequential: {result.steps} steps in {result.seconds:.0f} s; train top-1 (last "
        f"50 steps) {top1}; draft vocabulary coverage {result.coverage}; heads in {args.output}",
        flush=True,
    )
    return 0
