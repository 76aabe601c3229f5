"""``vllm-medusa train``: Medusa-1 heads on a frozen base model, on a CPU.

The base model's last hidden states (the LM head's input) are computed once with
transformers and cached (:mod:`.hidden`), so an epoch costs only the heads. Loss: sum over
heads of ``w_i * CE(head i at t, token t + 2 + i)`` over the answer positions (all positions
with ``--include-prompt``), computed over the full vocabulary by :mod:`.loss`. AdamW, linear
warm-up then cosine decay to zero; reference initialisation (residual weights zero, own LM
heads copies of the base LM head).

Training state (``train_state.pt`` in the output folder) is written every ``--save-every``
steps and at the end; ``--resume`` continues from it and reproduces an uninterrupted run
exactly (batches come from a per-epoch permutation seeded by ``--seed`` and the epoch).
The final heads are a canonical checkpoint (:func:`vllm_medusa.core.checkpoint.save_heads`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vllm_medusa.core.heads import MedusaConfig, MedusaHeads
from vllm_medusa.training.common import TrainingError
from vllm_medusa.training.hidden import IGNORE, HiddenCache
from vllm_medusa.training.loss import fused_head_loss

STATE_FILE = "train_state.pt"
METRICS_FILE = "train_metrics.json"
QUICK = {"epochs": 1, "batch_tokens": 64}


@dataclass
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    epochs: float = 1.0
    batch_tokens: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    head_weights: list[float] | None = None
    seed: int = 0
    save_every: int = 200
    max_steps: int | None = None  # stop after this many steps (the schedule is unchanged)
    train_vocab: int | None = None  # shared LM head only: softmax over the N most frequent
    chunk_rows: int = 1024
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.num_heads < 1 or self.num_layers < 0:
            raise TrainingError("--num-heads must be >= 1 and --num-layers >= 0")
        if self.epochs <= 0 or self.batch_tokens < 1 or self.lr <= 0:
            raise TrainingError("--epochs, --batch-tokens and --lr must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError("--warmup-ratio must be in [0, 1)")
        if self.head_weights is not None and len(self.head_weights) != self.num_heads:
            raise TrainingError(
                f"--head-weights has {len(self.head_weights)} values for {self.num_heads} heads"
            )
        if self.train_vocab is not None and not self.shared_lm_head:
            raise TrainingError("--train-vocab is only for the shared-LM-head variant")

    def schedule_key(self) -> dict:
        """What must match for ``--resume`` to continue the same run."""
        d = asdict(self)
        for k in ("save_every", "max_steps", "extra", "chunk_rows"):
            d.pop(k)
        return d


def lr_at(step: int, total: int, base_lr: float, warmup_ratio: float) -> float:
    """Linear warm-up over ``warmup_ratio * total`` steps, then cosine decay to zero."""
    warmup = max(1, int(round(warmup_ratio * total))) if warmup_ratio > 0 else 0
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(num_rows: int, batch_tokens: int, epoch: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_rows, generator=gen)
    return list(perm.split(batch_tokens))


@dataclass
class TrainResult:
    heads: MedusaHeads
    steps: int
    total_steps: int
    seconds: float
    history: list[dict]
    finished: bool


def _frequent_vocab(targets: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    valid = targets[targets != IGNORE]
    counts = torch.bincount(valid, minlength=vocab_size)
    return counts.topk(min(n, vocab_size)).indices.sort().values


def train_heads(
    cache: HiddenCache,
    base_lm_head: torch.Tensor,
    cfg: TrainConfig,
    output: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    base_model_name: str | None = None,
) -> TrainResult:
    """Train heads on cached hidden states; ``base_lm_head`` ``[V, H]`` stays frozen."""
    from tqdm import tqdm

    cfg.validate()
    torch.manual_seed(cfg.seed)
    vocab_size, hidden_size = base_lm_head.shape
    if cache.hidden_size != hidden_size:
        raise TrainingError(
            f"cached hidden states have size {cache.hidden_size}, the base LM head expects "
            f"{hidden_size}: the cache was made with another model"
        )
    base_lm_head = base_lm_head.detach().float().contiguous()
    targets_all = cache.targets(cfg.num_heads)  # [N, K]
    keep = (targets_all != IGNORE).any(dim=1)
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == 0:
        raise TrainingError("no training position has a target (answers too short?)")

    lm_for_loss = base_lm_head
    remap = None
    if cfg.train_vocab is not None:
        vocab_ids = _frequent_vocab(targets_all, cfg.train_vocab, vocab_size)
        lm_for_loss = base_lm_head[vocab_ids].contiguous()
        remap = torch.full((vocab_size,), IGNORE, dtype=torch.long)
        remap[vocab_ids] = torch.arange(vocab_ids.numel())
        valid = targets_all[targets_all != IGNORE]
        coverage = (remap[valid] != IGNORE).double().mean().item()
        print(
            f"train: training softmax over the {vocab_ids.numel()} most frequent target "
            f"tokens ({coverage:.2%} of the targets; the others are left out of the loss)",
            flush=True,
        )

    mcfg = MedusaConfig(
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        shared_lm_head=cfg.shared_lm_head,
        base_model_name_or_path=base_model_name,
    )
    heads = MedusaHeads(mcfg)
    heads.init_from_base_lm_head(base_lm_head)
    params = [p for p in heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps_per_epoch = math.ceil(rows.numel() / cfg.batch_tokens)
    total_steps = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    step = 0
    history: list[dict] = []
    elapsed_before = 0.0
    out_dir = Path(output) if output is not None else None
    state_path = out_dir / STATE_FILE if out_dir is not None else None
    if resume:
        if state_path is None or not state_path.is_file():
            raise TrainingError(f"--resume: no training state {state_path}")
        state = torch.load(state_path, weights_only=False)
        if state["schedule"] != cfg.schedule_key() or state["num_rows"] != rows.numel():
            raise TrainingError(
                f"--resume: {state_path} was written by a different run "
                f"(config {state['schedule']}, {state['num_rows']} rows); "
                "use the same data and options, or start afresh without --resume"
            )
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        history = state["history"]
        elapsed_before = state["seconds"]

    def save_state() -> None:
        if state_path is None:
            return
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_name(STATE_FILE + ".tmp")
        torch.save(
            {
                "heads": heads.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "schedule": cfg.schedule_key(),
                "num_rows": rows.numel(),
                "history": history,
                "seconds": elapsed_before + time.time() - t0,
            },
            tmp,
        )
        tmp.replace(state_path)

    head_w = torch.tensor(cfg.head_weights) if cfg.head_weights is not None else None
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    ema_acc = None
    t0 = time.time()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress)
    epoch_batches: tuple[int, list[torch.Tensor]] | None = None
    while step < stop_at:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch_batches is None or epoch_batches[0] != epoch:
            epoch_batches = (epoch, batch_indices(rows.numel(), cfg.batch_tokens, epoch, cfg.seed))
        idx = rows[epoch_batches[1][in_epoch]]
        lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = cache.hidden[idx].float()
        tgt = targets_all[idx].t().contiguous()  # [K, B]
        if remap is not None:
            tgt = torch.where(tgt == IGNORE, tgt, remap[tgt.clamp(min=0)])
        states = heads(x)  # [K, B, H]
        lm = lm_for_loss if heads.lm_head_weight is None else heads.lm_head_weight.detach()
        out = fused_head_loss(
            states.detach(),
            lm,
            tgt,
            head_w,
            chunk_rows=cfg.chunk_rows,
            want_lm_grad=heads.lm_head_weight is not None,
        )
        opt.zero_grad(set_to_none=True)
        states.backward(out.grad_states)
        if heads.lm_head_weight is not None:
            heads.lm_head_weight.grad = out.grad_lm_head
        opt.step()
        step += 1
        acc = (out.correct.double() / out.count.clamp(min=1).double()).tolist()
        ema_acc = (
            acc
            if ema_acc is None
            else [0.95 * e + 0.05 * a for e, a in zip(ema_acc, acc, strict=True)]
        )
        history.append(
            {"step": step, "lr": lr, "loss": out.loss.item(), "top1": [round(a, 4) for a in acc]}
        )
        bar.update(1)
        bar.set_postfix_str(
            f"loss {out.loss.item():.3f} top1 " + "/".join(f"{a:.3f}" for a in ema_acc)
        )
        if cfg.save_every and step % cfg.save_every == 0 and step < stop_at:
            save_state()
    bar.close()
    save_state()
    return TrainResult(
        heads=heads,
        steps=step,
        total_steps=total_steps,
        seconds=elapsed_before + time.time() - t0,
        history=history,
        finished=step >= total_steps,
    )


# ------------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="distillation JSONL (from `distill`)")
    p.add_argument("--output", required=True, help="heads folder (canonical checkpoint)")
    p.add_argument("--model", help="base model folder (default: the prepared SmolLM2-135M)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1)
    variant = p.add_mutually_exclusive_group()
    variant.add_argument(
        "--shared-lm-head",
        dest="shared_lm_head",
        action="store_true",
        default=True,
        help="heads reuse the frozen base LM head (default)",
    )
    variant.add_argument(
        "--own-lm-head",
        dest="shared_lm_head",
        action="store_false",
        help="each head has its own LM head, initialised from the base one",
    )
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-tokens", type=int, default=1024, help="positions per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--head-weights", help="comma-separated loss weight per head")
    p.add_argument("--include-prompt", action="store_true", help="also train on prompt positions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200, help="training state every N steps")
    p.add_argument("--max-steps", type=int, help="stop after N steps (schedule unchanged)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/train_state.pt")
    p.add_argument(
        "--train-vocab",
        type=int,
        help="shared LM head only: training softmax over the N most frequent target tokens "
        "(an approximation of the loss; inference stays full-vocabulary)",
    )
    p.add_argument("--cache", help="hidden-state cache file (default: beside --data)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 1 epoch, 64/step")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"vllm-medusa train: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from vllm_medusa.core.checkpoint import save_heads
    from vllm_medusa.training.common import (
        base_lm_head_weight,
        load_base_model,
        resolve_model,
        set_threads,
        write_json,
    )
    from vllm_medusa.training.hidden import cached_hidden

    set_threads(args.threads)
    head_weights = None
    if args.head_weights:
        try:
            head_weights = [float(x) for x in args.head_weights.split(",")]
        except ValueError as e:
            raise TrainingError(f"--head-weights: {e}") from e
    cfg = TrainConfig(
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        shared_lm_head=args.shared_lm_head,
        epochs=QUICK["epochs"] if args.quick else args.epochs,
        batch_tokens=QUICK["batch_tokens"] if args.quick else args.batch_tokens,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        head_weights=head_weights,
        seed=args.seed,
        save_every=args.save_every,
        max_steps=args.max_steps,
        train_vocab=args.train_vocab,
    )
    cfg.validate()
    t_start = time.time()
    model_path = resolve_model(args.model)
    model, _ = load_base_model(model_path)
    lm_head = base_lm_head_weight(model)
    cache = cached_hidden(
        args.data,
        model,
        model_path,
        cache_path=args.cache,
        include_prompt=args.include_prompt,
    )
    t_cache = time.time() - t_start
    result = train_heads(
        cache,
        lm_head,
        cfg,
        args.output,
        resume=args.resume,
        base_model_name=model_path.name,
    )
    if not result.finished:
        print(
            f"train: stopped after {result.steps}/{result.total_steps} steps "
            f"(--max-steps); continue with --resume",
            flush=True,
        )
        return 0
    last = result.history[-min(50, len(result.history)) :]
    top1 = [round(sum(h["top1"][i] for h in last) / len(last), 4) for i in range(cfg.num_heads)]
    recipe = {
        "data": str(args.data),
        "positions": int(cache.num_rows),
        "include_prompt": bool(args.include_prompt),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "hidden_cache_seconds": round(t_cache, 1),
        "train_top1_last_steps": top1,
    } | {k: v for k, v in asdict(cfg).items() if k not in ("extra", "save_every", "max_steps")}
    result.heads.config.extra = {"training": recipe}
    save_heads(result.heads, args.output)
    write_json(Path(args.output) / METRICS_FILE, {"recipe": recipe, "history": result.history})
    print(
        f"train: {result.steps} steps in {result.seconds:.0f} s (+{t_cache:.0f} s model load "
        f"and hidden states); train top-1 (last 50 steps) {top1}; heads in {args.output}",
        flush=True,
    )
    return 0
