"""``vllm-medusa distill``: the base model's own answers to prompts (self-distillation data).

Prompts (ShareGPT first user turns by default, or ``--prompts FILE.jsonl``) are rendered with
the model's chat template and answered by the base model with vLLM, in chunks; each chunk is
appended to the output JSONL (see :mod:`vllm_medusa.training.conversations`) so an
interrupted run resumes where it stopped (prompts whose index is already in the file are
skipped). vLLM is imported inside :func:`distill` only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from vllm_medusa.training.common import TrainingError, resolve_model
from vllm_medusa.training.conversations import (
    Conversation,
    append_conversations,
    read_conversations,
)

QUICK = {"limit": 8, "max_tokens": 32}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model folder (default: the prepared SmolLM2-135M)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="JSONL prompts file (default: ShareGPT first user turns)")
    src.add_argument(
        "--mt-bench",
        action="store_true",
        help="MT-Bench first turns (evaluation continuations only: never train on them)",
    )
    src.add_argument(
        "--sharegpt-heldout",
        action="store_true",
        help="the held-out ShareGPT split (first turns that teacher-force never reads)",
    )
    p.add_argument("--output", required=True, help="output JSONL (appended to, resumable)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length cap (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=1024,
        help="skip prompts longer than this after templating (1024)",
    )
    p.add_argument("--chunk-size", type=int, default=128, help="prompts per vLLM call (128)")
    p.add_argument(
        "--time-budget",
        type=float,
        help="minutes of generation: start no new chunk after this (resumable)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="skip vLLM's compilation warm-up (faster start, slower generation; on with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="tiny run: 8 prompts x 32 tokens")


def load_prompts(
    prompts_file: str | None,
    limit: int | None,
    mt_bench: bool = False,
    sharegpt_heldout: bool = False,
) -> list[str]:
    from vllm_medusa import data

    if mt_bench:
        prompts = data.mt_bench_first_turns()
    elif sharegpt_heldout:
        prompts = [prompt for _, prompt, _ in data.sharegpt_split("heldout")]
    elif prompts_file:
        prompts = data.load_prompts_file(prompts_file)
    else:
        prompts = data.load_sharegpt_prompts(limit=limit)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise TrainingError("no prompts to distill")
    return prompts


def tokenize_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    from vllm_medusa import data

    out = []
    for prompt in prompts:
        text = data.render_chat(tokenizer, prompt)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def distill(
    output: str | Path,
    *,
    model: str | Path | None = None,
    prompts_file: str | None = None,
    limit: int | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    max_prompt_tokens: int = 1024,
    chunk_size: int = 128,
    time_budget_min: float | None = None,
    mt_bench: bool = False,
    sharegpt_heldout: bool = False,
    enforce_eager: bool = False,
) -> dict:
    """Generate the missing answers into ``output``; returns counts for the whole file."""
    if max_tokens < 1 or chunk_size < 1 or max_prompt_tokens < 1:
        raise TrainingError("--max-tokens, --chunk-size and --max-prompt-tokens must be >= 1")
    if temperature < 0:
        raise TrainingError("--temperature must be >= 0")
    from tqdm import tqdm
    from transformers import AutoTokenizer

    prompts = load_prompts(prompts_file, limit, mt_bench, sharegpt_heldout)
    model_path = resolve_model(model)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_conversations(output, repair_tail=True) if output.exists() else []
    done_idx = {c.index for c in done}

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    todo: list[tuple[int, list[int]]] = []
    too_long = 0
    for i, prompt in enumerate(prompts):
        if i in done_idx:
            continue
        ids = tokenize_prompts(tokenizer, [prompt])[0]
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        todo.append((i, ids))
    print(
        f"distill: {len(prompts)} prompts, {len(done_idx)} already in {output}, "
        f"{too_long} skipped (> {max_prompt_tokens} prompt tokens), {len(todo)} to generate",
        flush=True,
    )

    new_convs = 0
    new_tokens = 0
    t0 = time.time()
    if todo:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM, SamplingParams

        llm = LLM(
            model=str(model_path),
            dtype="float32",
            seed=seed,
            max_model_len=max_prompt_tokens + max_tokens,
            enforce_eager=enforce_eager,
        )
        bar = tqdm(total=len(todo), desc="distill", unit="prompt", dynamic_ncols=True)
        t_gen = time.time()
        for start in range(0, len(todo), chunk_size):
            if time_budget_min is not None and time.time() - t_gen > time_budget_min * 60:
                print(f"distill: time budget of {time_budget_min} min reached", flush=True)
                break
            chunk = todo[start : start + chunk_size]
            params = [
                SamplingParams(
                    temperature=temperature,
                    max_tokens=max_tokens,
                    seed=None if temperature == 0 else seed * 1_000_003 + i,
                )
                for i, _ in chunk
            ]
            outs = llm.generate(
                [{"prompt_token_ids": ids} for _, ids in chunk], params, use_tqdm=False
            )
            convs = [
                Conversation(i, ids, list(out.outputs[0].token_ids))
                for (i, ids), out in zip(chunk, outs, strict=True)
            ]
            append_conversations(output, convs)
            new_convs += len(convs)
            new_tokens += sum(len(c.answer_ids) for c in convs)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{new_tokens / (time.time() - t_gen):.0f}")
        bar.close()

    total = read_conversations(output)
    stats = {
        "output": str(output),
        "conversations": len(total),
        "answer_tokens": sum(len(c.answer_ids) for c in total),
        "prompt_tokens": sum(len(c.prompt_ids) for c in total),
        "new_conversations": new_convs,
        "new_answer_tokens": new_tokens,
        "seconds": round(time.time() - t0, 1),
    }
    print(
        f"distill: produced {new_convs} conversations / {new_tokens} answer tokens in "
        f"{stats['seconds']} s; {output} now holds {stats['conversations']} conversations, "
        f"{stats['answer_tokens']} answer tokens",
        flush=True,
    )
    return stats


def run(args: argparse.Namespace) -> int:
    limit, max_tokens = args.limit, args.max_tokens
    if args.quick:
        limit = QUICK["limit"] if limit is None else limit
        max_tokens = QUICK["max_tokens"]
    try:
        distill(
            args.output,
            model=args.model,
            prompts_file=args.prompts,
            limit=limit,
            max_tokens=max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            max_prompt_tokens=args.max_prompt_tokens,
            chunk_size=args.chunk_size,
            time_budget_min=args.time_budget,
            mt_bench=args.mt_bench,
            sharegpt_heldout=args.sharegpt_heldout,
            enforce_eager=args.enforce_eager or args.quick,
        )
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"vllm-medusa distill: error: {e}", file=sys.stderr)
        return 2
    return 0
