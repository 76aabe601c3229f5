"""``vllm-medusa eval-heads``: per-head accuracy and the exact greedy tree-verification tau.

On held-out prompts (MT-Bench first turns by default: never trained on) the base model's
greedy continuation is the ground truth: a distillation file (``--continuations``, e.g. from
``vllm-medusa distill --mt-bench``) or generated here with transformers greedy decoding.

Measured, at every answer position (hidden state of the position whose base prediction is
an answer token; head ``i`` predicts the token ``2 + i`` further):
  - per-head top-1 / top-5 accuracy and the per-rank table ``P(rank r is right)``,
    ``r = 0..9`` (what :mod:`.calibrate` grows trees from);
  - tau for a tree, simulated step by step on the true continuation: at each verification
    step the tree is filled from the heads' top-k at the hidden state of the position that
    produced the current root token, the longest path matching the continuation is accepted,
    and generation advances by ``accepted + 1`` tokens (the bonus token). Because greedy
    verification accepts a node exactly when it equals the continuation, this is the tau
    that greedy tree decoding achieves with these heads, prompts and tree.

The report is JSON; the heads' top-k candidates and the targets are saved beside it
(``*.topk.safetensors``) so that :mod:`.calibrate` can simulate other trees without the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_medusa.core.tree import MedusaTree
from vllm_medusa.training.common import TrainingError
from vllm_medusa.training.hidden import IGNORE, HiddenCache

MAX_RANK = 10
QUICK = {"limit": 4, "max_tokens": 32}


@dataclass
class Candidates:
    """Heads' top-k at every evaluated position, with the truth.

    ``topk`` ``[N, K, R]`` token ids, ``targets`` ``[N, K]`` (token ``pos + 2 + i``, or -100
    past the end), ``conv`` ``[N]`` conversation number; rows of a conversation are
    consecutive positions starting at the last prompt token.
    """

    topk: torch.Tensor
    targets: torch.Tensor
    conv: torch.Tensor

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {
                "topk": self.topk.to(torch.int32).contiguous(),
                "targets": self.targets.to(torch.int32).contiguous(),
                "conv": self.conv.to(torch.int32).contiguous(),
            },
            str(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise TrainingError(f"candidates file {path} does not exist (run eval-heads)")
        t = load_file(str(path))
        return cls(t["topk"].long(), t["targets"].long(), t["conv"].long())

    @property
    def num_heads(self) -> int:
        return self.topk.shape[1]


@torch.no_grad()
def head_candidates(
    heads,
    cache: HiddenCache,
    base_lm_head: torch.Tensor | None,
    *,
    max_rank: int = MAX_RANK,
    chunk_rows: int = 512,
    progress: bool = True,
) -> Candidates:
    """Top-``max_rank`` candidates of every head at every cached position (full vocabulary)."""
    from tqdm import tqdm

    n = cache.num_rows
    out = torch.empty(n, heads.num_heads, max_rank, dtype=torch.long)
    lm = None if base_lm_head is None else base_lm_head.float()
    for start in tqdm(range(0, n, chunk_rows), desc="heads top-k", disable=not progress):
        x = cache.hidden[start : start + chunk_rows].float()
        out[start : start + chunk_rows] = heads.topk(x, max_rank, lm)
    return Candidates(out, cache.targets(heads.num_heads), cache.conv.clone())


@torch.no_grad()
def step_cost_ms(
    heads, base_lm_head: torch.Tensor | None, batch_sizes=(1, 8), repeats: int = 20
) -> dict[str, float]:
    """Median wall time (ms) of one drafting call (blocks + LM head + top-10) per batch size:
    what the heads add to every decoding step."""
    lm = None if base_lm_head is None else base_lm_head.float()
    out = {}
    for b in batch_sizes:
        x = torch.randn(b, heads.config.hidden_size)
        heads.topk(x, MAX_RANK, lm)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            heads.topk(x, MAX_RANK, lm)
            times.append((time.perf_counter() - t0) * 1e3)
        out[f"batch_{b}"] = round(sorted(times)[len(times) // 2], 3)
    return out


def rank_accuracy(c: Candidates) -> torch.Tensor:
    """``[K, R]``: fraction of positions (with a target) where rank r of head i is right."""
    valid = c.targets != IGNORE  # [N, K]
    hit = (c.topk == c.targets[:, :, None]) & valid[:, :, None]
    return hit.sum(0).double() / valid.sum(0).clamp(min=1).double()[:, None]


def accepted_lengths(c: Candidates, tree: MedusaTree) -> torch.Tensor:
    """``[N]``: nodes greedy verification would accept if a step started at each row."""
    if tree.depth > c.num_heads:
        raise TrainingError(f"tree depth {tree.depth} exceeds the {c.num_heads} heads")
    if tree.top_k > c.topk.shape[2]:
        raise TrainingError(
            f"tree uses rank {tree.top_k - 1} but only top-{c.topk.shape[2]} was kept"
        )
    buffers = tree.buffers()
    tokens = buffers.fill(c.topk)  # [N, nodes]
    depth = torch.tensor(tree.depths[1:])
    truth = c.targets[:, depth - 1]  # [N, nodes]
    match = tokens == truth
    ok = torch.zeros(c.topk.shape[0], tree.num_nodes + 1, dtype=torch.bool)
    ok[:, 0] = True
    for node, parent in enumerate(tree.parents[1:], start=1):  # BFS: parents come first
        ok[:, node] = match[:, node - 1] & ok[:, parent]
    return (ok[:, 1:].long() * depth).max(dim=1).values


def simulate_tau(c: Candidates, tree: MedusaTree) -> dict:
    """Step-by-step greedy tree decoding over every conversation; see the module doc."""
    acc = accepted_lengths(c, tree).tolist()
    conv = c.conv.tolist()
    bounds = []
    start = 0
    for i in range(1, len(conv) + 1):
        if i == len(conv) or conv[i] != conv[start]:
            bounds.append((start, i))
            start = i
    steps = 0
    emitted = 0
    accepted = 0
    for lo, hi in bounds:
        rows = hi - lo  # = answer length; row j produced answer[j]
        j = 0
        while j < rows - 1:  # answer[j + 1 ..] still to come
            n = min(acc[lo + j], rows - 2 - j)
            steps += 1
            accepted += n
            emitted += min(n + 1, rows - 1 - j)
            j += n + 1
    return {
        "tau": emitted / steps if steps else 0.0,
        "mean_accepted": accepted / steps if steps else 0.0,
        "steps": steps,
        "tokens": emitted,
        "nodes": tree.num_nodes,
    }


def predicted_tau(paths, rank_acc) -> float:
    """1 + sum over nodes of the product of rank accuracies along the node's path."""
    total = 1.0
    for p in paths:
        g = 1.0
        for depth, r in enumerate(p):
            g *= float(rank_acc[depth][r])
        total += g
    return total


# ------------------------------------------------------------------------------ data


def _greedy_continuations(model, tokenizer, prompts: list[str], max_tokens: int, progress: bool):
    """Greedy answers with transformers, one prompt at a time (no padding effects)."""
    from tqdm import tqdm

    from vllm_medusa.training.conversations import Conversation
    from vllm_medusa.training.distill import tokenize_prompts

    eos = tokenizer.eos_token_id
    out = []
    for i, ids in enumerate(
        tqdm(
            tokenize_prompts(tokenizer, prompts), desc="greedy continuations", disable=not progress
        )
    ):
        x = torch.tensor([ids])
        with torch.no_grad():
            g = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=eos,
            )
        out.append(Conversation(i, ids, g[0, len(ids) :].tolist()))
    return out


def evaluate_heads(
    heads,
    cache: HiddenCache,
    base_lm_head: torch.Tensor | None,
    trees: dict[str, MedusaTree],
    *,
    progress: bool = True,
    embed_weight: torch.Tensor | None = None,
) -> tuple[dict, Candidates]:
    """Accuracy and simulated tau of Medusa-1 heads, or of sequential heads (which need the
    base model's input embedding ``embed_weight`` to read their paths)."""
    from vllm_medusa.core.sequential_heads import SequentialHeads
    from vllm_medusa.training.sequential import sequential_candidates, sequential_step_ms

    t0 = time.time()
    sequential = isinstance(heads, SequentialHeads)
    if sequential:
        if embed_weight is None:
            raise TrainingError("sequential heads need the base model's input embedding")
        cand = sequential_candidates(heads, cache, embed_weight, progress=progress)
    else:
        cand = head_candidates(heads, cache, base_lm_head, progress=progress)
    ra = rank_accuracy(cand)
    report = {
        "positions": int(cache.num_rows),
        "conversations": int(cache.conv.unique().numel()),
        "top1": [round(float(ra[i, 0]), 4) for i in range(ra.shape[0])],
        "top5": [round(float(ra[i, :5].sum()), 4) for i in range(ra.shape[0])],
        "rank_accuracy": [[round(float(v), 5) for v in row] for row in ra],
        "trees": {},
    }
    for name, tree in trees.items():
        sim = simulate_tau(cand, tree)
        sim["predicted_tau"] = round(predicted_tau(tree.paths, ra), 4)
        sim["tau"] = round(sim["tau"], 4)
        sim["mean_accepted"] = round(sim["mean_accepted"], 4)
        report["trees"][name] = sim
    report["seconds"] = round(time.time() - t0, 1)
    if sequential:
        # Depth-by-depth drafting costs one head call per depth: time the first tree's fill.
        report["heads_step_ms"] = sequential_step_ms(
            heads, next(iter(trees.values())), embed_weight
        )
    else:
        report["heads_step_ms"] = step_cost_ms(heads, base_lm_head)
    return report, cand


def format_report(report: dict) -> str:
    k = len(report["top1"])
    lines = [
        f"positions {report['positions']} in {report['conversations']} conversations",
        "head  top-1   top-5   " + " ".join(f"r{r:<5d}" for r in range(MAX_RANK)),
    ]
    for i in range(k):
        ranks = " ".join(f"{v:.4f}" for v in report["rank_accuracy"][i])
        lines.append(f"{i:>4}  {report['top1'][i]:.4f}  {report['top5'][i]:.4f}  {ranks}")
    for name, t in report["trees"].items():
        lines.append(
            f"tree {name}: {t['nodes']} nodes, simulated tau {t['tau']:.4f} "
            f"(predicted {t['predicted_tau']:.4f}), {t['steps']} steps"
        )
    if "heads_step_ms" in report:
        lines.append(f"heads per-step cost (ms, median): {report['heads_step_ms']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", required=True, help="heads folder (any format load_heads reads)")
    p.add_argument("--model", help="base model folder (default: the prepared SmolLM2-135M)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="JSONL prompts (default: MT-Bench first turns)")
    src.add_argument(
        "--continuations",
        help="distillation JSONL with the base model's greedy answers (skips generation)",
    )
    p.add_argument("--limit", type=int, help="first N prompts only")
    p.add_argument("--max-tokens", type=int, default=256, help="continuation length (256)")
    p.add_argument(
        "--tree",
        help="tree: preset name, JSON file or path list like '[[0],[0,0]]' "
        "(default: the heads' tree.json, else chain-<num heads>)",
    )
    p.add_argument("--output", help="JSON report (default: HEADS/eval.json)")
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="tiny run: 4 prompts x 32 tokens")


def parse_tree_arg(spec: str | None, heads_dir: Path, num_heads: int) -> tuple[str, MedusaTree]:
    import json

    from vllm_medusa.core.checkpoint import read_tree_file
    from vllm_medusa.core.tree import TreeError

    try:
        if spec is None:
            paths = read_tree_file(heads_dir)
            if paths is not None:
                return "tree.json", MedusaTree.from_paths(paths, num_heads=num_heads)
            return f"chain-{num_heads}", MedusaTree.resolve(f"chain-{num_heads}")
        if spec.lstrip().startswith("["):
            return "custom", MedusaTree.from_paths(json.loads(spec), num_heads=num_heads)
        return Path(spec).name if spec.endswith(".json") else spec, MedusaTree.resolve(
            spec, num_heads=num_heads
        )
    except (TreeError, json.JSONDecodeError) as e:
        raise TrainingError(f"--tree: {e}") from e


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"vllm-medusa eval-heads: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from vllm_medusa.core.checkpoint import CheckpointError, load_heads
    from vllm_medusa.training.common import (
        base_lm_head_weight,
        load_base_model,
        model_dims,
        resolve_model,
        set_threads,
        write_json,
    )
    from vllm_medusa.training.conversations import append_conversations, read_conversations
    from vllm_medusa.training.hidden import cached_hidden, compute_hidden

    set_threads(args.threads)
    limit, max_tokens = args.limit, args.max_tokens
    if args.quick:
        limit = QUICK["limit"] if limit is None else limit
        max_tokens = QUICK["max_tokens"]
    heads_dir = Path(args.heads)
    model_path = resolve_model(args.model)
    hidden_size, vocab_size = model_dims(model_path)
    try:
        heads = load_heads(
            heads_dir, expected_hidden_size=hidden_size, expected_vocab_size=vocab_size
        )
    except CheckpointError as e:
        raise TrainingError(f"heads {heads_dir} do not fit the base model {model_path}: {e}") from e
    heads.eval()
    tree_name, tree = parse_tree_arg(args.tree, heads_dir, heads.num_heads)
    trees = {tree_name: tree}
    chain = f"chain-{heads.num_heads}"
    trees.setdefault(chain, MedusaTree.resolve(chain))

    output = Path(args.output) if args.output else heads_dir / "eval.json"
    model, tokenizer = load_base_model(model_path)
    if args.continuations:
        convs = read_conversations(args.continuations)
        if limit is not None:
            convs = convs[:limit]
        source = str(args.continuations)
    else:
        from vllm_medusa import data

        if args.prompts:
            prompts = data.load_prompts_file(args.prompts)
            source = str(args.prompts)
        else:
            prompts = data.mt_bench_first_turns()
            source = "mt-bench first turns"
        prompts = prompts[:limit] if limit is not None else prompts
        if not prompts:
            raise TrainingError("no evaluation prompts")
        convs = _greedy_continuations(model, tokenizer, prompts, max_tokens, progress=True)
        saved = output.with_name(output.stem + ".continuations.jsonl")
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.unlink(missing_ok=True)
        append_conversations(saved, convs)
        print(f"eval-heads: greedy continuations saved to {saved}", flush=True)
    if args.continuations and limit is None:
        cache = cached_hidden(args.continuations, model, model_path)  # reused across heads
    else:
        cache = compute_hidden(model, convs, include_prompt=False)
    lm = base_lm_head_weight(model)
    embed = model.get_input_embeddings().weight.detach()
    report, cand = evaluate_heads(heads, cache, lm, trees, embed_weight=embed)
    # Names, not paths: reports get committed beside shipped heads.
    report = {"heads": heads_dir.name, "model": model_path.name, "data": Path(source).name} | report
    cand_path = output.with_name(output.stem + ".topk.safetensors")
    output.parent.mkdir(parents=True, exist_ok=True)
    cand.save(cand_path)
    report["candidates_file"] = cand_path.name
    write_json(output, report)
    print(format_report(report))
    print(f"eval-heads: report in {output}", flush=True)
    return 0
