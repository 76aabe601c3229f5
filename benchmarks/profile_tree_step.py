"""Where the time of one tree-verification step goes, by stage.

Each (tree size, concurrency) runs in its own process: an in-process vLLM engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) whose runner, attention backend, proposer and
scheduler methods are wrapped with wall-clock timers before the engine is built. The
prompts are decoded greedily with ``draft_budget="full"`` (every step drafts the whole
tree); the report averages the steady decode steps in which every request verifies a full
tree, and, from a plain engine in the same run, the plain decode steps at the same
concurrency.

Stages (ms per step, nested stages are inside their parents):

- ``step``: ``EngineCore.step`` (scheduler + runner + output processing);
- ``schedule`` / ``update``: the scheduler's ``schedule`` and ``update_from_output``;
- ``prepare``: ``_prepare_inputs`` (vLLM's + tree positions + ``plan``: the tree plan);
- ``forward``: the model forward; inside it ``attention`` (vLLM's CPU kernel, all layers, on
  the rows it computes: prefills, plain decodes, each tree's leading exact rows) and ``fixup``
  (the other tree rows, with the ancestor mask, all layers); ``attention_all_rows``: vLLM's
  kernel timed on every row of the step as a plain forward of as many tokens would run it
  (measurement only: a scratch output, and its time is taken out of the other stages);
- ``lm_head``: ``compute_logits`` of the verified rows;
- ``sample``: the patched ``_sample``: ``accept`` (longest-path acceptance), the bonus
  sampler, ``compact`` (KV compaction of accepted nodes);
- ``bookkeeping``: ``_bookkeeping_sync``; ``propose``: ``propose_draft_token_ids``, with
  ``draft`` (heads + tree fill) inside.

The goal of the overhead issue: ``step <= 1.10 x (plain forward + lm_head + draft)``
("overhead ratio" below), where the plain forward of the step's tokens is
``forward - fixup - attention + attention_all_rows``; the same ratio without drafting is
shown for plain steps.

    python benchmarks/profile_tree_step.py [--nodes 4 8 16 32] [--concurrency 1 16]
        [--max-tokens 64] [--output benchmarks/results/profile_tree_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

STAGES = [
    "step",
    "schedule",
    "update",
    "execute",
    "prepare",
    "plan",
    "forward",
    "attention",
    "attention_all_rows",
    "fixup",
    "lm_head",
    "sample_tokens",
    "sample",
    "accept",
    "compact",
    "bookkeeping",
    "propose",
    "draft",
]


# ---- child: one engine, timers around its stages --------------------------------------------


class StageClock:
    """Per-step wall-clock totals of the wrapped stages."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.meta: dict = {}
        self.steps: list[dict] = []

    def wrap(self, owner, name: str, stage: str) -> None:
        original = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.current[stage] += time.perf_counter() - start

        timed.__wrapped__ = original
        for attr in ("__vllm_medusa_patch__",):
            if hasattr(original, attr):
                setattr(timed, attr, getattr(original, attr))
        setattr(owner, name, timed)

    def exclude(self, seconds: float, stages: tuple[str, ...]) -> None:
        """Take time spent on measurement only (not serving) out of the enclosing stages."""
        for stage in stages:
            self.current[stage] -= seconds

    def end_step(self) -> None:
        if self.meta:
            self.steps.append({"ms": {k: v * 1e3 for k, v in self.current.items()}, **self.meta})
        self.current = defaultdict(float)
        self.meta = {}


def _child(job: dict, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import vllm_medusa
    from vllm_medusa.engine_args import medusa_engine_kwargs

    vllm_medusa.register()  # install the patches first, so that the timers wrap them
    from vllm_medusa.integration import proposer, runner_patches, tree_attention

    clock = StageClock()

    # The step's shape: tokens, requests, draft tokens verified (from the scheduler output).
    original_execute = GPUModelRunner.execute_model

    def execute_model(self, scheduler_output, *args, **kwargs):
        spec = scheduler_output.scheduled_spec_decode_tokens
        clock.meta = {
            "tokens": scheduler_output.total_num_scheduled_tokens,
            "requests": len(scheduler_output.num_scheduled_tokens),
            "drafts": [len(spec.get(r, ())) for r in scheduler_output.num_scheduled_tokens],
        }
        return original_execute(self, scheduler_output, *args, **kwargs)

    GPUModelRunner.execute_model = execute_model
    # Reference attention: vLLM's kernel over every row of the step, as a plain forward of the
    # same tokens would run it (the tree backend keeps it off the rows the tree kernel
    # computes). Timed into a scratch output and taken out of the stages around it.
    vllm_attention = CPUAttentionBackendImpl.forward
    tree_forward = tree_attention.TreeCPUAttentionBackendImpl.forward

    def forward_with_reference(self, layer, query, key, value, kv_cache, md, output, *a, **kw):
        if getattr(md, "vllm_medusa_trimmed", None) is not None:
            start = time.perf_counter()
            vllm_attention(self, layer, query, key, value, kv_cache, md, output.clone(), *a, **kw)
            seconds = time.perf_counter() - start
            clock.current["attention_all_rows"] += seconds
            clock.exclude(seconds, ("forward", "execute", "step"))
        return tree_forward(self, layer, query, key, value, kv_cache, md, output, *a, **kw)

    tree_attention.TreeCPUAttentionBackendImpl.forward = forward_with_reference
    for owner, name, stage in [
        (GPUModelRunner, "execute_model", "execute"),
        (GPUModelRunner, "_prepare_inputs", "prepare"),
        (runner_patches, "build_tree_plan", "plan"),
        (GPUModelRunner, "_model_forward", "forward"),
        (CPUAttentionBackendImpl, "forward", "attention"),
        (tree_attention.TreeCPUAttentionBackendImpl, "_recompute_tree_rows", "fixup"),
        (GPUModelRunner, "sample_tokens", "sample_tokens"),
        (GPUModelRunner, "_sample", "sample"),
        (runner_patches, "tree_accept_greedy", "accept"),
        (runner_patches, "compact_accepted_kv", "compact"),
        (GPUModelRunner, "_bookkeeping_sync", "bookkeeping"),
        (GPUModelRunner, "propose_draft_token_ids", "propose"),
        (proposer.TreeMedusaProposer, "propose_tree", "draft"),
        (Scheduler, "schedule", "schedule"),
        (Scheduler, "update_from_output", "update"),
        (EngineCore, "step", "step"),
    ]:
        clock.wrap(owner, name, stage)
    original_step = EngineCore.step

    def step(self, *args, **kwargs):
        try:
            return original_step(self, *args, **kwargs)
        finally:
            clock.end_step()

    EngineCore.step = step

    engine = dict(job["engine"])
    if job.get("medusa"):
        m = job["medusa"]
        engine.update(medusa_engine_kwargs(m["heads"], m["tree"], draft_budget="full"))
    llm = LLM(job["model"], dtype="float32", seed=0, **engine)
    # lm_head: the model's compute_logits (bound on the instance, wrapped after the build).
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    clock.wrap(model, "compute_logits", "lm_head")

    tok = llm.get_tokenizer()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in job["prompts"]
    ]
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    clock.steps.clear()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)

    batch = len(prompts)
    full = job.get("num_nodes", 0)
    # Steady decode steps: every request decodes (one token + its drafts), all of them.
    steady = [
        s
        for s in clock.steps
        if s["requests"] == batch
        and all(d == full for d in s["drafts"])
        and s["tokens"] == batch * (full + 1)
    ]
    means = {
        stage: float(np.mean([s["ms"].get(stage, 0.0) for s in steady])) if steady else None
        for stage in STAGES + ["lm_head"]
    }
    Path(out_path).write_text(
        json.dumps(
            {
                "steady_steps": len(steady),
                "all_steps": len(clock.steps),
                "ms": means,
                "tokens_per_s": n_out / seconds,
                "output_tokens": n_out,
            }
        )
    )


# ---- parent: one child per configuration, one table --------------------------------------


def _tree_paths(heads_dir: Path, num_nodes: int) -> list[list[int]]:
    """The first ``num_nodes`` nodes of the heads' calibrated growth order (a tree at every
    prefix: each node's parent was grown before it)."""
    calib = sorted(heads_dir.glob("*.calibration.json"))
    if not calib:
        raise SystemExit(f"{heads_dir} has no *.calibration.json with a growth order")
    order = json.loads(calib[0].read_text())["growth_order"]
    if num_nodes > len(order):
        raise SystemExit(f"the growth order has only {len(order)} nodes")
    return order[:num_nodes]


def overhead_ratio(ms: dict, drafting: bool) -> float | None:
    """step / (plain forward of the step's tokens + LM head [+ drafting]); the plain forward
    is the measured one with vLLM's kernel over every row in place of the tree attention."""
    if ms.get("step") is None:
        return None
    base = ms["forward"] - ms.get("fixup", 0.0) + ms["lm_head"]
    if ms.get("attention_all_rows"):
        base += ms["attention_all_rows"] - ms["attention"]
    if drafting:
        base += ms.get("draft", 0.0)
    return ms["step"] / base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--heads", default=None, help="heads folder (default: shipped heads)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    args = parser.parse_args()
    if args.child:
        _child(json.loads(Path(args.child[0]).read_text()), args.child[1])
        return 0

    from tqdm import tqdm

    from vllm_medusa.data import mt_bench_first_turns
    from vllm_medusa.models import default_model_path
    from vllm_medusa.paths import shipped_heads_dir

    heads = Path(args.heads) if args.heads else shipped_heads_dir()
    model = str(default_model_path())
    questions = mt_bench_first_turns()
    configs = [(0, b) for b in args.concurrency] + [
        (n, b) for n in args.nodes for b in args.concurrency
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, b in tqdm(configs, desc="profile", unit="config"):
            job = {
                "model": model,
                "engine": {
                    "enforce_eager": True,
                    "max_num_seqs": b,
                    "enable_prefix_caching": False,
                },
                "prompts": questions[:b],
                "max_tokens": args.max_tokens,
                "num_nodes": n,
                "medusa": {"heads": str(heads), "tree": _tree_paths(heads, n)} if n else None,
            }
            job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
            job_file.write_text(json.dumps(job))
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(job_file), str(out_file)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"nodes={n} concurrency={b} failed:\n{proc.stderr[-4000:]}")
            out = json.loads(out_file.read_text())
            results.append({"nodes": n, "concurrency": b, **out})

    print_table(results)
    if args.output:
        Path(args.output).write_text(
            json.dumps({"label": args.label, "results": results}, indent=1)
        )
    return 0


def print_table(results: list[dict]) -> None:
    cols = [
        "step",
        "forward",
        "attention",
        "attention_all_rows",
        "fixup",
        "lm_head",
        "draft",
        "accept",
        "compact",
    ]
    cols += ["plan", "prepare", "bookkeeping", "schedule", "update"]
    print("ms per steady decode step (nodes 0 = plain decoding)")
    print("| nodes | reqs | steps | " + " | ".join(cols) + " | overhead ratio |")
    print("|" + "---|" * (len(cols) + 4))
    for r in results:
        ms = r["ms"]
        cells = ["-" if ms.get(c) is None else f"{ms[c]:.1f}" for c in cols]
        ratio = overhead_ratio(ms, drafting=r["nodes"] > 0)
        print(
            f"| {r['nodes']} | {r['concurrency']} | {r['steady_steps']} | "
            + " | ".join(cells)
            + f" | {'-' if ratio is None else f'{ratio:.2f}'} |"
        )


if __name__ == "__main__":
    sys.exit(main())
