"""``vllm-medusa learning-curve``: how head quality grows with training data.

For each data size (answer tokens of a ``teacher-force`` folder) train heads with the same
recipe, then on each held-out continuation file (the base model's greedy answers from
``distill``: MT-Bench, the held-out ShareGPT split) report top-1 per head and the simulated
greedy tau of the chain and of trees grown from measured path frequencies. A tree is grown on
one held-out file and its tau measured on the other, so no number is tuned on its own data.
Sequential heads by default; ``--head-type medusa1`` trains Medusa-1 heads on the same data
and labels (the base model's greedy next tokens) for a side-by-side comparison.

Writes ``curve.json`` and ``curve.png`` (top-1 of head 0 and tau vs data) in ``--output``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vllm_medusa.training.hidden import HiddenCache

BUDGETS = (4, 8, 16, 32, 64)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="teacher-force folder")
    p.add_argument("--eval", required=True, help="comma-separated held-out continuation files")
    p.add_argument("--sizes", default="100000,300000,1000000", help="answer tokens per run")
    p.add_argument("--output", required=True, help="folder for heads, curve.json, curve.png")
    p.add_argument("--head-type", choices=("sequential", "medusa1"), default="sequential")
    p.add_argument("--model", help="base model folder (default: the prepared SmolLM2-135M)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int)


class GreedyLabels(HiddenCache):
    """A teacher-forcing cache whose Medusa-1 targets are the base model's greedy tokens
    (head ``i`` at ``t``: ``argmax p(. | x_<=t+1+i)``), the labels sequential heads get."""

    def targets(self, num_heads: int) -> torch.Tensor:
        from vllm_medusa.training.sequential import path_examples

        return path_examples(self, num_heads, greedy_path_only=False)[1]


def evaluate_all(heads, caches: dict, lm_head, embed) -> dict:
    """Per held-out file: top-1 per head, chain tau, and tau of trees grown on the other."""
    from vllm_medusa.core.sequential_heads import SequentialHeads
    from vllm_medusa.core.tree import MedusaTree
    from vllm_medusa.training.calibrate import grow_tree, grow_tree_from_paths, path_frequencies
    from vllm_medusa.training.evaluate import head_candidates, rank_accuracy, simulate_tau
    from vllm_medusa.training.sequential import sequential_candidates

    cands = {}
    for name, cache in caches.items():
        if isinstance(heads, SequentialHeads):
            cands[name] = sequential_candidates(heads, cache, embed, progress=False)
        else:
            cands[name] = head_candidates(heads, cache, lm_head, progress=False)
    out = {}
    names = list(caches)
    for name in names:
        c = cands[name]
        other = cands[names[(names.index(name) + 1) % len(names)]]
        ra = rank_accuracy(c)
        row = {
            "top1": [round(float(ra[i, 0]), 4) for i in range(ra.shape[0])],
            "top5": [round(float(ra[i, :5].sum()), 4) for i in range(ra.shape[0])],
            "tau_chain": round(
                simulate_tau(c, MedusaTree.resolve(f"chain-{heads.num_heads}"))["tau"], 4
            ),
            "tau_tree": {},
        }
        order = grow_tree_from_paths(
            path_frequencies(other, 10),
            max(BUDGETS),
            grow_tree(rank_accuracy(other).tolist(), max(BUDGETS), 10),
        )
        for b in BUDGETS:
            tree = MedusaTree.from_paths(order[:b])
            row["tau_tree"][b] = round(simulate_tau(c, tree)["tau"], 4)
        out[name] = row
    return out


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    sizes = [r["tokens"] for r in curve["runs"]]
    for name in curve["eval"]:
        for head in range(len(curve["runs"][0]["eval"][name]["top1"])):
            axes[0].plot(
                sizes,
                [r["eval"][name]["top1"][head] for r in curve["runs"]],
                "o-",
                label=f"{name}, head {head}",
            )
        axes[1].plot(
            sizes, [r["eval"][name]["tau_tree"]["16"] for r in curve["runs"]], "o-", label=name
        )
    for ax, title in zip(axes, ("held-out top-1 per head", "simulated tau, 16-node tree")):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{curve['head_type']} heads, {curve['epochs']} epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from vllm_medusa.training.common import run_guarded

    return run_guarded("learning-curve", _run, args)


def _run(args: argparse.Namespace) -> int:
    import json

    from vllm_medusa.core.checkpoint import save_heads
    from vllm_medusa.core.sequential_heads import save_sequential_heads
    from vllm_medusa.training.common import (
        base_lm_head_weight,
        load_base_model,
        resolve_model,
        set_threads,
        write_json,
    )
    from vllm_medusa.training.hidden import cached_hidden
    from vllm_medusa.training.sequential import SequentialTrainConfig, train_sequential
    from vllm_medusa.training.teacher import load_teacher_data
    from vllm_medusa.training.train import TrainConfig, train_heads

    set_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(args.model)
    model, _ = load_base_model(model_path)
    lm_head = base_lm_head_weight(model)
    embed = model.get_input_embeddings().weight.detach()
    caches = {Path(f).stem: cached_hidden(f, model, model_path) for f in args.eval.split(",")}
    curve_file = out / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else {"runs": []}
    curve.update(head_type=args.head_type, epochs=args.epochs, eval=list(caches))
    done = {r["tokens"] for r in curve["runs"]}
    for size in sizes:
        if size in done:
            print(f"learning-curve: {size} tokens already in {curve_file}", flush=True)
            continue
        data = load_teacher_data(args.data, size)
        t0 = time.time()
        if args.head_type == "sequential":
            cfg = SequentialTrainConfig(
                num_heads=args.num_heads,
                draft_vocab=args.draft_vocab,
                epochs=args.epochs,
                lr=args.lr,
            )
            heads = train_sequential(data, lm_head, embed, cfg, base_model_name=model_path.name)
            heads = heads.heads
        else:
            labelled = GreedyLabels(data.hidden, data.tokens, data.pos, data.seq_end, data.conv)
            labelled.next_token = data.next_token
            cfg = TrainConfig(
                num_heads=args.num_heads,
                epochs=args.epochs,
                lr=args.lr,
                train_vocab=args.draft_vocab,
                save_every=0,
            )
            heads = train_heads(labelled, lm_head, cfg).heads
        seconds = time.time() - t0
        heads.config.extra = {
            "training": {"data": Path(args.data).name, "tokens": size, "seconds": round(seconds)}
            | {k: v for k, v in vars(cfg).items() if k != "extra"}
        }
        if args.head_type == "sequential":
            save_sequential_heads(heads, out / f"heads-{size}", weights_dtype=torch.float16)
        else:
            save_heads(heads, out / f"heads-{size}")
        heads.eval()
        tokens = int((data.next_token >= 0).sum())
        row = {
            "tokens": size,
            "labelled_tokens": tokens,
            "positions": int(data.num_rows),
            "train_seconds": round(seconds, 1),
            "eval": evaluate_all(heads, caches, lm_head, embed),
        }
        curve["runs"] = sorted(curve["runs"] + [row], key=lambda r: r["tokens"])
        write_json(curve_file, curve)
        print(f"learning-curve: {size} tokens: {json.dumps(row['eval'])}", flush=True)
    curve = json.loads(curve_file.read_text())
    plot(curve, out / "curve.png")
    print(f"learning-curve: {curve_file}, {out / 'curve.png'}", flush=True)
    return 0
