"""``vllm-medusa calibrate-tree``: grow a token tree from measured per-head rank accuracies.

With ``acc[i][r]`` the probability that rank ``r`` of head ``i`` is the right token (from
``eval-heads``), a node with rank path ``(r_1, ..., r_d)`` is accepted with probability
about ``prod_j acc[j-1][r_j]`` (heads treated as independent), and the expected number of
accepted tokens of a tree is the sum of that over its nodes. The tree for a node budget is
grown greedily (the method behind Medusa's published trees): start from the root and keep
adding, among the children of nodes already in the tree (ranks ``< max_rank``, depth
``<= num_heads``), the one with the highest expected gain. Since a child never gains more
than its parent, this greedy tree is also the best tree of its size under the model, and
every prefix of the growth order is itself the greedy tree of that size.

The tree for ``--budget`` is written as ``tree.json`` beside the heads (serving picks it up
by default); the report gives the predicted tau and the tau simulated on the evaluation data
(see :mod:`.evaluate`) for every budget of ``--budgets``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import torch

from vllm_medusa.training.common import TrainingError

DEFAULT_BUDGETS = (4, 8, 16, 32, 64)


def grow_tree(rank_acc, budget: int, max_rank: int | None = None) -> list[list[int]]:
    """The greedy tree of ``budget`` nodes, in growth order (each prefix is a valid tree).

    ``rank_acc`` ``[K][R]``: per head, per rank accuracy. Ties go to the shallower, then
    lexicographically smaller path.
    """
    k = len(rank_acc)
    if k == 0:
        raise TrainingError("empty accuracy table")
    r_max = min(len(row) for row in rank_acc)
    if max_rank is not None:
        r_max = min(r_max, max_rank)
    if budget < 1:
        raise TrainingError(f"the node budget must be >= 1, got {budget}")
    for row in rank_acc:
        for v in row:
            if not 0.0 <= float(v) <= 1.0:
                raise TrainingError(f"accuracies must lie in [0, 1], got {v}")
    heap: list[tuple[float, int, tuple[int, ...]]] = []

    def push_children(path: tuple[int, ...], gain: float) -> None:
        depth = len(path)
        if depth >= k:
            return
        for r in range(r_max):
            child = path + (r,)
            heapq.heappush(heap, (-(gain * float(rank_acc[depth][r])), depth + 1, child))

    push_children((), 1.0)
    tree: list[list[int]] = []
    while heap and len(tree) < budget:
        neg_gain, _, path = heapq.heappop(heap)
        tree.append(list(path))
        push_children(path, -neg_gain)
    return tree


def truth_rank_paths(candidates, max_rank: int) -> torch.Tensor:
    """``[N, K]``: rank of the true token in each head's candidates at every position, or
    ``max_rank`` where it is not among the first ``max_rank`` (or there is no target)."""
    from vllm_medusa.training.hidden import IGNORE

    r = min(max_rank, candidates.topk.shape[2])
    hit = candidates.topk[:, :, :r] == candidates.targets[:, :, None]  # [N, K, r]
    rank = torch.where(
        hit.any(-1), hit.float().argmax(-1), torch.full_like(hit[..., 0], r, dtype=torch.long)
    )
    return torch.where(candidates.targets == IGNORE, r, rank)


def path_frequencies(candidates, max_rank: int) -> dict[tuple[int, ...], float]:
    """Fraction of positions whose true tokens follow each rank path: the probability that
    a tree node with that path is accepted, measured jointly over depths (for sequential
    heads the candidates at depth ``d`` are conditioned on the true path before it)."""
    ranks = truth_rank_paths(candidates, max_rank)
    n, k = ranks.shape
    r = min(max_rank, candidates.topk.shape[2])
    freq: dict[tuple[int, ...], float] = {}
    alive = torch.ones(n, dtype=torch.bool)
    code = torch.zeros(n, dtype=torch.long)
    for depth in range(k):
        alive &= ranks[:, depth] < r
        code = code * (r + 1) + ranks[:, depth]
        values, counts = torch.unique(code[alive], return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            path = []
            for _ in range(depth + 1):
                v, digit = divmod(v, r + 1)
                path.append(digit)
            freq[tuple(reversed(path))] = c / max(n, 1)
    return freq


def grow_tree_from_paths(freq: dict, budget: int, fallback) -> list[list[int]]:
    """The tree of ``budget`` nodes with the highest measured expected accepted length:
    the most frequent rank paths (``freq`` from :func:`path_frequencies`; a child is never
    more frequent than its parent, so the set is a tree; ties go to the shallower path).
    Paths never seen are taken from ``fallback`` (the independence growth order) once the
    seen ones run out."""
    order = sorted(freq, key=lambda p: (-freq[p], len(p), p))[:budget]
    seen = set(order)
    for p in fallback:
        if len(order) >= budget:
            break
        if tuple(p) not in seen:
            order.append(tuple(p))
            seen.add(tuple(p))
    return [list(p) for p in order]


def calibrate(
    rank_acc,
    budgets=DEFAULT_BUDGETS,
    candidates=None,
    max_rank: int | None = None,
) -> dict:
    """Predicted (and, with ``candidates`` from eval-heads, simulated) tau per budget.

    With candidates the tree grows from measured path frequencies (conditional accuracies,
    exact for sequential heads); without, from per-head rank accuracies treated as
    independent."""
    from vllm_medusa.core.tree import MedusaTree
    from vllm_medusa.training.evaluate import predicted_tau, simulate_tau

    order = grow_tree(rank_acc, max(budgets), max_rank)
    freq = None
    if candidates is not None:
        freq = path_frequencies(candidates, max_rank or candidates.topk.shape[2])
        order = grow_tree_from_paths(freq, max(budgets), order)
    rows = []
    for b in sorted(budgets):
        paths = order[:b]
        tree = MedusaTree.from_paths(paths)
        predicted = (
            predicted_tau(paths, rank_acc)
            if freq is None
            else 1 + sum(freq.get(tuple(p), 0.0) for p in paths)
        )
        row = {
            "budget": b,
            "nodes": tree.num_nodes,
            "nodes_per_depth": tree.nodes_per_depth(),
            "predicted_tau": round(predicted, 4),
            "growth": "path frequencies" if freq is not None else "independent ranks",
        }
        if candidates is not None:
            row["simulated_tau"] = round(simulate_tau(candidates, tree)["tau"], 4)
        rows.append(row)
    return {"growth_order": order, "budgets": rows}


def plot(report: dict, path: str | Path, chain: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["budgets"]
    x = [r["budget"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, [r["predicted_tau"] for r in rows], "o--", label="predicted")
    if all("simulated_tau" in r for r in rows):
        ax.plot(x, [r["simulated_tau"] for r in rows], "o-", label="simulated (eval data)")
    if chain:
        ax.axhline(chain["tau"], color="grey", lw=0.8, label=f"{chain['name']} (simulated)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree nodes")
    ax.set_ylabel("tau (tokens per step)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", required=True, help="heads folder (tree.json is written there)")
    p.add_argument("--eval", help="eval-heads report (default: HEADS/eval.json)")
    p.add_argument("--budget", type=int, default=64, help="nodes of the saved tree (64)")
    p.add_argument(
        "--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="budgets to report"
    )
    p.add_argument("--max-rank", type=int, default=10, help="ranks considered (10)")
    p.add_argument("--output", help="tree file (default: HEADS/tree.json)")
    p.add_argument("--report", help="calibration report JSON (default: beside the eval report)")
    p.add_argument("--plot", help="PNG of tau vs budget")
    p.add_argument("--no-save", action="store_true", help="report only, write no tree")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"vllm-medusa calibrate-tree: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from vllm_medusa.core.tree import MedusaTree
    from vllm_medusa.training.common import write_json
    from vllm_medusa.training.evaluate import Candidates, simulate_tau

    heads_dir = Path(args.heads)
    eval_path = Path(args.eval) if args.eval else heads_dir / "eval.json"
    if not eval_path.is_file():
        raise TrainingError(f"no eval report {eval_path}: run `vllm-medusa eval-heads` first")
    try:
        ev = json.loads(eval_path.read_text())
        rank_acc = ev["rank_accuracy"]
    except (json.JSONDecodeError, KeyError) as e:
        raise TrainingError(f"{eval_path} is not an eval-heads report: {e}") from e
    try:
        budgets = sorted({int(b) for b in args.budgets.split(",") if b.strip()})
    except ValueError as e:
        raise TrainingError(f"--budgets: {e}") from e
    budgets = sorted(set(budgets) | {args.budget})
    cand = None
    if ev.get("candidates_file"):
        cand_path = eval_path.parent / ev["candidates_file"]
        if cand_path.is_file():
            cand = Candidates.load(cand_path)
    report = calibrate(rank_acc, budgets, cand, args.max_rank)
    chain_name = f"chain-{len(rank_acc)}"
    chain = None
    if cand is not None:
        chain = {
            "name": chain_name,
            "tau": simulate_tau(cand, MedusaTree.resolve(chain_name))["tau"],
        }
    report = {"eval": str(eval_path), "max_rank": args.max_rank, "chain": chain} | report
    tree_paths = MedusaTree.from_paths(report["growth_order"][: args.budget]).to_json()
    if not args.no_save:
        tree_file = Path(args.output) if args.output else heads_dir / "tree.json"
        tree_file.parent.mkdir(parents=True, exist_ok=True)
        chosen = next(r for r in report["budgets"] if r["budget"] == args.budget)
        tree_file.write_text(json.dumps({"paths": tree_paths, "calibration": chosen}) + "\n")
        report["tree_file"] = str(tree_file)
    report_path = (
        Path(args.report)
        if args.report
        else eval_path.with_name(eval_path.stem + ".calibration.json")
    )
    write_json(report_path, report)
    if args.plot:
        plot(report, args.plot, chain)
    print("budget  nodes/depth           predicted  simulated")
    for r in report["budgets"]:
        sim = f"{r['simulated_tau']:.4f}" if "simulated_tau" in r else "-"
        print(
            f"{r['budget']:>6}  {str(r['nodes_per_depth']):<20}  {r['predicted_tau']:.4f}     {sim}"
        )
    if chain:
        print(f"{chain_name}: simulated tau {chain['tau']:.4f}")
    if not args.no_save:
        print(f"calibrate-tree: {args.budget}-node tree written to {report['tree_file']}")
    print(f"calibrate-tree: report in {report_path}", flush=True)
    return 0
