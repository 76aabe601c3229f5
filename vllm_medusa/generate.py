"""``vllm-medusa generate``: answer prompts with vLLM and report throughput.

Prompts (MT-Bench first turns, ShareGPT opening turns, or a JSONL file) are rendered with
the model's chat template and generated in one ``LLM.generate`` call. ``--speculative-config``
and ``--additional-config`` go to ``vllm.LLM`` unchanged; when the engine counts
speculative-decoding drafts, the mean number of tokens accepted per step is printed too, and
with tree Medusa what the draft budget chose.

The terminal shows what a person reads: a progress bar, the answers and the summary. Everything
vLLM and its libraries print (hundreds of start-up lines, from this process and the engine's)
goes to a log file, named in the first line, unless ``--verbose``.

vLLM is imported inside :func:`run`; a script that builds an engine needs an
``if __name__ == "__main__":`` guard (vLLM may start worker processes that re-import it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
PROMPT_SOURCES = ("mt-bench", "sharegpt")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="HF model folder or name (default: the prepared SmolLM2-135M-Instruct, "
        "prepared on first use)",
    )
    parser.add_argument(
        "--prompts",
        default="mt-bench",
        help="mt-bench (first turns), sharegpt (opening human turns), or a JSONL file "
        "(default: mt-bench)",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=8, help="how many prompts, 0 for all (default 8)"
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (128)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    parser.add_argument("--output", type=Path, default=None, help="write results as JSONL here")
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        default=2.0,
        help=f"CPU KV cache size in GiB; sets ${KV_CACHE_ENV} unless it is set (default 2)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="engine context length (model default)"
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="skip torch.compile: the engine starts ~70 s sooner on CPU but decodes ~1.5x "
        "slower (worth it for short runs)",
    )
    parser.add_argument(
        "--medusa-heads",
        default=None,
        metavar="DIR",
        help="serve with tree Medusa using these heads ('shipped': the heads shipped for "
        "SmolLM2-135M-Instruct); their tree.json is the default tree",
    )
    parser.add_argument(
        "--medusa-tree",
        default=None,
        help="tree preset, JSON file or JSON list of rank paths (default: the heads' tree)",
    )
    from vllm_medusa.serve import add_acceptance_argument, add_draft_budget_argument

    add_draft_budget_argument(parser)
    add_acceptance_argument(parser)
    parser.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="passed to vllm.LLM(speculative_config=...)",
    )
    parser.add_argument(
        "--additional-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="passed to vllm.LLM(additional_config=...)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only the summary, not each answer"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print vLLM's own output (start-up log, warnings) here instead of to the log file",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="where vLLM's output goes without --verbose (default: "
        "<cache>/logs/generate-<time>.log)",
    )


def default_log_file() -> Path:
    from vllm_medusa.paths import cache_dir

    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / time.strftime("generate-%Y%m%d-%H%M%S.log")


@contextlib.contextmanager
def process_output_to(log_path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so also C++ libraries
    and the child processes vLLM starts) to ``log_path``; yield (out, err) text streams on the
    original terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield out, err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        out.close()
        err.close()


def load_prompt_set(source: str, num_prompts: int) -> list[str]:
    """``source`` is ``mt-bench``, ``sharegpt`` or a JSONL file; ``num_prompts <= 0`` = all."""
    from vllm_medusa import data

    limit = num_prompts if num_prompts > 0 else None
    if source == "mt-bench":
        prompts = data.mt_bench_first_turns()
    elif source == "sharegpt":
        return data.load_sharegpt_prompts(limit)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"--prompts {source!r}: no such file (use mt-bench, sharegpt, or a JSONL file)"
            )
        prompts = data.load_prompts_file(path)
    return prompts[:limit] if limit is not None else prompts


def spec_decode_stats(metrics) -> dict | None:
    """Tau and accepted-length distribution from ``LLM.get_metrics()`` (None: no drafts)."""
    from vllm_medusa.metrics import summarize_vllm_metrics

    summary = summarize_vllm_metrics(metrics or [])
    if not summary.num_drafts:
        return None
    return {
        "drafts": summary.num_drafts,
        "draft_tokens": summary.num_draft_tokens,
        "accepted_tokens": summary.num_accepted_tokens,
        "tau": round(summary.tau, 4),
        "accepted_length_distribution": [
            round(p, 4) for p in summary.accepted_length_distribution()
        ],
    }


def draft_budget_choices(nodes_chosen: list[int]) -> dict | None:
    """What the draft budget chose: steps per number of tree nodes drafted (None: no step)."""
    steps = sum(nodes_chosen)
    if not steps:
        return None
    return {
        "tree_nodes": len(nodes_chosen) - 1,
        "steps_by_nodes": {n: c for n, c in enumerate(nodes_chosen) if c},
        "mean_nodes": round(sum(n * c for n, c in enumerate(nodes_chosen)) / steps, 2),
    }


def _medusa_counters(llm) -> dict | None:
    try:
        return llm.collective_rpc("vllm_medusa_counters")[0]
    except Exception:  # not tree Medusa (the plugin's worker method is absent)
        return None


def resolve_heads(value: str) -> Path:
    if value == "shipped":
        from vllm_medusa.paths import shipped_heads_dir

        return shipped_heads_dir()
    return Path(value)


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault(KV_CACHE_ENV, f"{args.kv_cache_gib:g}")

    if args.model is None:
        from vllm_medusa.models import default_model_path

        model = str(default_model_path())
    else:
        model = args.model

    try:
        prompts = load_prompt_set(args.prompts, args.num_prompts)
    except (FileNotFoundError, ValueError) as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    if not prompts:
        print(f"generate: no prompts from {args.prompts!r}", file=sys.stderr)
        return 2

    if args.verbose:
        return _generate(args, model, prompts, sys.stdout, sys.stderr)
    log_path = args.log_file or default_log_file()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"generate: vLLM's log goes to {log_path} (--verbose to print it here)", flush=True)
    with process_output_to(log_path) as (out, err):
        try:
            return _generate(args, model, prompts, out, err)
        except BaseException:
            print(f"generate: failed; vLLM's log is {log_path}", file=err)
            raise


def _generate(args, model: str, prompts: list[str], out, err) -> int:
    from tqdm.auto import tqdm
    from vllm import LLM, SamplingParams

    from vllm_medusa.data import render_chat

    say = functools.partial(print, file=out)
    llm_kwargs: dict = {
        "model": model,
        "dtype": "float32",
        "seed": args.seed,
        "disable_log_stats": False,  # get_metrics() needs stat logging
    }
    if args.max_model_len is not None:
        llm_kwargs["max_model_len"] = args.max_model_len
    if args.enforce_eager:
        llm_kwargs["enforce_eager"] = True
    if args.medusa_heads is not None:
        from vllm_medusa.engine_args import medusa_engine_kwargs
        from vllm_medusa.serve import medusa_options, parse_tree_option

        llm_kwargs.update(
            medusa_engine_kwargs(
                resolve_heads(args.medusa_heads),
                parse_tree_option(args.medusa_tree),
                **medusa_options(args),
            )
        )
    if args.speculative_config is not None:
        llm_kwargs["speculative_config"] = args.speculative_config
    if args.additional_config is not None:
        llm_kwargs["additional_config"] = args.additional_config

    t_engine = time.perf_counter()
    llm = LLM(**llm_kwargs)
    engine_s = time.perf_counter() - t_engine

    tokenizer = llm.get_tokenizer()
    rendered = [render_chat(tokenizer, p) for p in prompts]
    # The template already holds any special tokens the model wants; don't add a second BOS.
    inputs = [
        {"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
        for text in rendered
    ]
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )

    t0 = time.perf_counter()
    progress = functools.partial(tqdm, file=err)  # vLLM's bar ("Processed prompts"), here
    outputs = llm.generate(inputs, params, use_tqdm=progress)
    seconds = time.perf_counter() - t0

    records = []
    for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        completion = output.outputs[0]
        records.append(
            {
                "index": i,
                "prompt": prompt,
                "output": completion.text,
                "prompt_tokens": len(output.prompt_token_ids or []),
                "output_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason,
                "output_token_ids": list(completion.token_ids),
            }
        )
        if not args.quiet:
            say(f"--- [{i}] {_short(prompt, 160)}")
            say(f"    => {_short(completion.text)}")

    n_out = sum(r["output_tokens"] for r in records)
    summary = {
        "model": model,
        "prompts": args.prompts,
        "requests": len(records),
        "output_tokens": n_out,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(n_out / seconds, 2) if seconds > 0 else None,
        "engine_start_s": round(engine_s, 1),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
    }
    try:
        spec = spec_decode_stats(llm.get_metrics())
    except Exception:  # metrics are optional (stat logging off, older engine)
        spec = None
    if spec is not None:
        summary["spec_decode"] = spec
    counters = _medusa_counters(llm) if args.medusa_heads is not None else None
    budget = draft_budget_choices(counters["nodes_chosen"]) if counters else None
    if budget is not None:
        summary["draft_budget"] = budget

    say(
        f"generate: {summary['requests']} requests, {n_out} output tokens in {seconds:.2f} s "
        f"= {summary['tokens_per_s']} tokens/s (engine start {engine_s:.1f} s)"
    )
    if spec is not None:
        say(
            f"generate: Medusa tau {spec['tau']:.3f} (mean tokens per verification step; "
            f"{spec['drafts']} steps with drafts, {spec['accepted_tokens']} accepted draft "
            f"tokens); accepted length distribution {spec['accepted_length_distribution']}"
        )
    if budget is not None:
        say(
            f"generate: draft budget ({args.medusa_draft_budget or 'auto'}) drafted, per step, "
            f"the first n of {budget['tree_nodes']} tree nodes: {{n: steps}} {budget['steps_by_nodes']} "
            f"(mean {budget['mean_nodes']})"
        )

    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        summary_path = args.output.with_suffix(".summary.json")
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        say(f"generate: wrote {args.output} and {summary_path}")
    # Stop the engine now, while its messages still go to the log (not at interpreter exit).
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    from vllm_medusa.cli import main

    sys.exit(main(["generate", *sys.argv[1:]]))
