"""Run one vLLM engine job in its own process and write the outputs as JSON.

Tests and benchmarks start this module with ``subprocess`` so that every engine lives in a fresh process
(vLLM cannot build a second engine in a process after a speculative one).

    python -m vllm_medusa.engine_job JOB.json OUT.json

JOB: {"model": str, "engine": {LLM kwargs}, "medusa": {"heads": dir, "tree": ...} | null,
      "prompts": [str] (chat-rendered here) | "prompt_token_ids": [[int]],
      "sampling": {SamplingParams kwargs} | "sampling_per_prompt": [{...}],
      "one_at_a_time": bool,
      "continue": {SamplingParams kwargs} (optional: afterwards, one at a time, each request
      again with its prompt + output as prompt_token_ids)}
OUT: {"token_ids": [[int]], "texts": [str], "finish_reasons": [str], "logprobs": [...],
      "prompt_logprobs": [...], "spec": {summary} | null, "seconds": float,
      "draft_tokens": [int | null], "spec_steps": [[steps, accepted] | null] (per request:
      draft tokens, verification steps, accepted drafts; with engine
      {"per_request_spec_decode_metrics": "summary"}),
      "counters": {vLLM counter: value} (COUNTERS, at the end),
      "medusa_counters": {TreeCounters.as_dict()} | null,
      "continuations": {"prompt_token_ids", "token_ids", "finish_reasons",
                        "prefix_cache_hits": [cached prompt tokens per request]} | null}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# vLLM counters a job reports (tests assert that what they exercise really happened).
COUNTERS = ("vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:prefix_cache_queries")


def _counters(llm) -> dict[str, float]:
    values = dict.fromkeys(COUNTERS, 0.0)
    for m in llm.get_metrics():
        if m.name in values:
            values[m.name] += float(m.value)
    return values


def _continue(llm, outs, sampling: dict) -> dict:
    """Each request again, one at a time, with its prompt + output as its prompt: the new
    prompt's blocks were written by the first request's decoding (tree verification with
    Medusa), so a prefix cache serves them."""
    from vllm import SamplingParams

    params = SamplingParams(**sampling)
    result = {
        "prompt_token_ids": [],
        "token_ids": [],
        "finish_reasons": [],
        "prefix_cache_hits": [],
    }
    for o in outs:
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        hits = _counters(llm)["vllm:prefix_cache_hits"]
        (out,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        result["prompt_token_ids"].append(ids)
        result["token_ids"].append(list(out.outputs[0].token_ids))
        result["finish_reasons"].append(out.outputs[0].finish_reason)
        result["prefix_cache_hits"].append(int(_counters(llm)["vllm:prefix_cache_hits"] - hits))
    return result


def run_in_subprocess(
    job: dict, workdir: Path, name: str, env: dict | None = None, timeout: float | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run this module on ``job`` in a fresh process (``NAME.job.json`` / ``NAME.out.json`` in
    ``workdir``); return the finished process and the output file's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, out_file = workdir / f"{name}.job.json", workdir / f"{name}.out.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_medusa.engine_job", str(job_file), str(out_file)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    return proc, out_file


def _draft_tokens(completion) -> int | None:
    """Draft tokens vLLM scheduled for one request (None without per-request metrics)."""
    metrics = getattr(completion, "spec_decode_metrics", None)
    return None if metrics is None else metrics.num_draft_tokens


def _spec_steps(completion) -> list[int] | None:
    """[verification steps, accepted draft tokens] of one request (None without metrics)."""
    metrics = getattr(completion, "spec_decode_metrics", None)
    if metrics is None:
        return None
    hist = metrics.histogram
    return [sum(hist), sum(j * c for j, c in enumerate(hist))]


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 1)))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vllm_medusa.metrics import summarize_vllm_metrics

    engine = dict(job.get("engine", {}))
    if job.get("medusa"):
        from vllm_medusa.engine_args import medusa_engine_kwargs

        m = job["medusa"]
        engine.update(medusa_engine_kwargs(m["heads"], m.get("tree"), **m.get("options", {})))
    engine.setdefault("dtype", "float32")
    engine.setdefault("seed", 0)
    engine.setdefault("disable_log_stats", False)
    llm = LLM(job["model"], **engine)

    if "prompt_token_ids" in job:
        inputs = [{"prompt_token_ids": ids} for ids in job["prompt_token_ids"]]
    else:
        tok = llm.get_tokenizer()
        inputs = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in job["prompts"]
        ]
    if "sampling_per_prompt" in job:
        params = [SamplingParams(**sp) for sp in job["sampling_per_prompt"]]
    else:
        params = SamplingParams(**job.get("sampling", {"temperature": 0, "max_tokens": 32}))

    start = time.perf_counter()
    if job.get("one_at_a_time"):
        outs = []
        for k, x in enumerate(inputs):
            p = params[k] if isinstance(params, list) else params
            outs.extend(llm.generate([x], p, use_tqdm=False))
    else:
        outs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start

    def _lp(entries):
        if entries is None:
            return None
        return [None if e is None else {str(t): lp.logprob for t, lp in e.items()} for e in entries]

    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "finish_reasons": [o.outputs[0].finish_reason for o in outs],
        "logprobs": [_lp(o.outputs[0].logprobs) for o in outs],
        "prompt_logprobs": [_lp(o.prompt_logprobs) for o in outs],
        "seconds": seconds,
        "spec": None,
        "draft_tokens": [_draft_tokens(o.outputs[0]) for o in outs],
        "spec_steps": [_spec_steps(o.outputs[0]) for o in outs],
        "continuations": _continue(llm, outs, job["continue"]) if "continue" in job else None,
    }
    result["counters"] = _counters(llm)
    result["medusa_counters"] = (
        llm.collective_rpc("vllm_medusa_counters")[0] if job.get("medusa") else None
    )
    spec = summarize_vllm_metrics(llm.get_metrics())
    if spec.num_drafts:
        result["spec"] = {
            "tau": spec.tau,
            "num_drafts": spec.num_drafts,
            "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_tokens": spec.num_accepted_tokens,
            "accepted_per_position": spec.accepted_per_position,
        }
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
