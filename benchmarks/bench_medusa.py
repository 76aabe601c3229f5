"""Plain decoding vs vLLM's chain Medusa vs tree Medusa, in one run.

Each (config, concurrency) runs in its own subprocess (``python -m vllm_medusa.engine_job``),
one after another, on the same prompts (MT-Bench first turns, or the held-out ShareGPT split);
the table reports output tokens/s, tau (mean tokens per verification step) and the speedup
over plain decoding at the same concurrency, plus whether the greedy outputs are identical to
plain decoding's. ``tree-*`` use ``--heads`` (default: the shipped sequential heads);
``vllm-chain`` and ``medusa1-tree-auto`` use ``--chain-heads`` (default: the shipped Medusa-1
heads, the only kind vLLM's own chain Medusa loads).

    python benchmarks/bench_medusa.py [--prompts mt-bench|sharegpt-heldout] [--num-prompts 80]
        [--max-tokens 128] [--concurrency 1 16]
        [--configs vllm-chain medusa1-tree-auto tree-full tree-auto]
        [--temperature 0.7 --acceptance greedy typical exact]

Machines are noisy: compare ratios within one run, never absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm


def _run_job(job: dict, workdir: Path, name: str, env: dict | None = None) -> dict:
    job_file, out_file = workdir / f"{name}.job.json", workdir / f"{name}.out.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_medusa.engine_job", str(job_file), str(out_file)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default=None, help="heads folder (default: shipped heads)")
    parser.add_argument(
        "--chain-heads", default=None, help="Medusa-1 heads (default: shipped Medusa-1 heads)"
    )
    parser.add_argument("--prompts", choices=["mt-bench", "sharegpt-heldout"], default="mt-bench")
    parser.add_argument("--tree", default=None, help="tree for tree Medusa (default: heads')")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["vllm-chain", "medusa1-tree-auto", "tree-full", "tree-auto"],
        choices=["plain", "vllm-chain", "medusa1-tree-auto", "tree-full", "tree-auto"],
        help="what to run besides plain decoding (always run: the reference)",
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="engines without torch.compile (~70 s less per engine start on CPU)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of every request (0: greedy, outputs compared with plain)",
    )
    parser.add_argument(
        "--acceptance",
        nargs="+",
        default=["greedy"],
        choices=["greedy", "typical", "exact"],
        help="acceptance option(s) of the tree configs; each runs as its own config "
        "(e.g. tree-full/typical) when not just greedy",
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_medusa.json"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from safetensors.torch import load_file

    from vllm_medusa.core.checkpoint import export_vllm, load_heads
    from vllm_medusa.data import mt_bench_first_turns, sharegpt_split
    from vllm_medusa.models import default_model_path
    from vllm_medusa.paths import SHIPPED_MEDUSA1_HEADS, shipped_heads_dir

    model = default_model_path()
    heads_dir = Path(args.heads) if args.heads else shipped_heads_dir()
    chain_dir = (
        Path(args.chain_heads) if args.chain_heads else shipped_heads_dir(SHIPPED_MEDUSA1_HEADS)
    )
    heads = load_heads(chain_dir)
    if args.prompts == "mt-bench":
        prompts = mt_bench_first_turns()[: args.num_prompts]
    else:
        prompts = [p for _, p, _ in sharegpt_split("heldout")][: args.num_prompts]
    workdir = Path(tempfile.mkdtemp(prefix="bench-medusa-"))
    state = load_file(model / "model.safetensors")
    base_lm_head = state.get("lm_head.weight", state.get("model.embed_tokens.weight"))
    vllm_heads = export_vllm(heads, workdir / "vllm-heads", base_lm_head_weight=base_lm_head)
    del state

    configs = {
        "plain": ({}, None),
        # vLLM's own top-1 chain Medusa: plugin disabled, heads in vLLM's layout.
        "vllm-chain": (
            {
                "speculative_config": {
                    "method": "medusa",
                    "model": str(vllm_heads),
                    "num_speculative_tokens": heads.num_heads,
                }
            },
            {"VLLM_PLUGINS": "none"},
        ),
        # Tree Medusa with the Medusa-1 heads (their calibrated tree, default budget).
        "medusa1-tree-auto": ({}, None),
        # The whole tree every step, and the default cost-aware draft budget.
        "tree-full": ({"draft_budget": "full"}, None),
        "tree-auto": ({}, None),
    }
    configs = {c: configs[c] for c in ["plain", *args.configs] if c in configs}
    if args.acceptance != ["greedy"]:  # one config per acceptance option of the tree configs
        configs = {
            (f"{c}/{mode}" if "tree" in c else c): (
                {**kw, "acceptance": mode} if "tree" in c else kw,
                env,
            )
            for c, (kw, env) in configs.items()
            for mode in (args.acceptance if "tree" in c else [None])
        }
    runs = [(c, n) for n in args.concurrency for c in configs]
    results = []
    for config, concurrency in tqdm(runs, desc="benchmark", unit="run"):
        engine_kwargs, env = configs[config]
        job = {
            "model": str(model),
            "engine": {
                "max_model_len": 2048,
                "max_num_seqs": concurrency,
                "enforce_eager": args.eager,
            },
            "prompts": prompts,
            "sampling": {"temperature": args.temperature, "max_tokens": args.max_tokens},
            "one_at_a_time": concurrency == 1,
            "kv_cache_gib": 2,
        }
        if config.startswith("tree"):
            job["medusa"] = {"heads": str(heads_dir), "tree": args.tree, "options": engine_kwargs}
        elif config.startswith("medusa1-tree"):
            job["medusa"] = {"heads": str(chain_dir), "tree": None, "options": engine_kwargs}
        else:
            job["engine"].update(engine_kwargs)
        out = _run_job(job, workdir, f"{config}-c{concurrency}", env)
        tokens = sum(len(t) for t in out["token_ids"])
        results.append(
            {
                "config": config,
                "concurrency": concurrency,
                "output_tokens": tokens,
                "seconds": out["seconds"],
                "tokens_per_s": tokens / out["seconds"],
                "tau": out["spec"]["tau"] if out["spec"] else 1.0,
                "token_ids": out["token_ids"],
            }
        )

    print(f"\n{len(prompts)} {args.prompts} prompts x {args.max_tokens} tokens, heads {heads_dir}")
    print(f"{'config':<17} {'conc':>4} {'tok/s':>8} {'tau':>6} {'speedup':>8} {'= plain':>8}")
    for r in results:
        plain = next(
            p for p in results if p["config"] == "plain" and p["concurrency"] == r["concurrency"]
        )
        r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"]
        # sampled outputs differ from plain decoding's by chance: nothing to compare
        same = r["token_ids"] == plain["token_ids"] if args.temperature == 0 else "n/a"
        r["identical_to_plain"] = same
        print(
            f"{r['config']:<17} {r['concurrency']:>4} {r['tokens_per_s']:>8.1f} "
            f"{r['tau']:>6.2f} {r['speedup']:>7.2f}x {str(same):>8}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for r in results:
        r.pop("token_ids")
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
