"""SmolLM2-135M-Instruct: preparation from the GGUF, and greedy generation with vLLM on CPU.

The slow tests prepare the model in the shared default cache (once, ~40 s) and run one vLLM
engine with tree Medusa (the shipped heads) in a subprocess (``vllm-medusa generate``, as the
main job runs it) for two prompts: an MT-Bench question whose answer must be coherent, a short
prompt whose greedy tokens must equal transformers', and a terminal that shows the answers
and the summary while vLLM's own output goes to the log file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from vllm_medusa import models

HAWAII_QUESTION_ID = 81
SHORT_PROMPT = "Write a short poem about the sea."
COMPARE_TOKENS = 16
MAX_TOKENS = 64
STOPWORDS = {
    "a", "about", "an", "and", "as", "at", "for", "from", "in", "is", "it", "of", "on", "or",
    "recent", "that", "the", "this", "to", "trip", "with", "your",
}  # fmt: skip
HAWAII_PLACES = {"hawaii", "hawaiian", "oahu", "maui", "kauai", "honolulu", "waikiki", "aloha"}


# --------------------------------------------------------------------------- fast


def test_unknown_model_lists_known_ones(capsys):
    with pytest.raises(ValueError, match="known models: smollm2"):
        models.prepare_model("llama-70b")
    from vllm_medusa.cli import main

    assert main(["prepare-model", "no-such-model"]) == 2
    assert "known models: smollm2" in capsys.readouterr().err


def test_incomplete_folder_is_not_prepared(tmp_path):
    assert not models.is_prepared(tmp_path)
    (tmp_path / models.MARKER).write_text(json.dumps({"model": models.SMOLLM2_NAME}))
    assert not models.is_prepared(tmp_path)  # marker without the files


def test_gguf_is_found():
    path = models.locate_smollm2_gguf()
    assert path.name == models.SMOLLM2_GGUF and path.stat().st_size > 50 * 2**20


# --------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def smollm2():
    return models.prepare_smollm2()


@pytest.mark.slow
def test_prepared_folder(smollm2):
    for name in (*models.REQUIRED_FILES, models.MARKER, "chat_template.jinja"):
        assert (smollm2 / name).is_file(), name
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    marker = json.loads((smollm2 / models.MARKER).read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", marker["source"]["sha256"])
    assert marker["verify"]["max_abs_logit_diff"] <= 1e-5
    # tied: the checkpoint holds no separate lm_head
    from safetensors import safe_open

    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    # idempotent and fast the second time, through the CLI too
    t0 = time.perf_counter()
    assert models.prepare_smollm2() == smollm2
    assert models.default_model_path() == smollm2
    assert time.perf_counter() - t0 < 2.0
    out = subprocess.run(
        [sys.executable, "-m", "vllm_medusa.cli", "prepare-model", "smollm2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == str(smollm2)


@pytest.mark.slow
def test_prepared_tokenizer(smollm2):
    from transformers import AutoTokenizer

    from vllm_medusa.data import render_chat

    tok = AutoTokenizer.from_pretrained(smollm2)
    text = render_chat(tok, "hi")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok("hello").input_ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    # digits are split one by one, as in the original tokenizer (restored after GGUF)
    assert tok.convert_ids_to_tokens(tok("x  5").input_ids) == ["x", "ĠĠ", "5"]


@pytest.fixture(scope="module")
def vllm_run(smollm2, tmp_path_factory):
    """One vLLM engine, in a subprocess, greedy over [Hawaii question, short prompt]."""
    pytest.importorskip("vllm")
    from vllm_medusa.data import load_mt_bench

    question = next(q for q in load_mt_bench() if q["question_id"] == HAWAII_QUESTION_ID)
    work = tmp_path_factory.mktemp("vllm_generate")
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in (question["turns"][0], SHORT_PROMPT)) + "\n"
    )
    output = work / "out.jsonl"
    log = work / "vllm.log"
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [
        sys.executable, "-m", "vllm_medusa.cli", "generate",
        "--model", str(smollm2),
        "--prompts", str(prompts),
        "--num-prompts", "2",
        "--max-tokens", str(MAX_TOKENS),
        "--temperature", "0",
        "--max-model-len", "2048",
        "--enforce-eager",  # a short run: compiling would cost more than it saves
        "--medusa-heads", "shipped",
        "--output", str(output),
        "--log-file", str(log),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:] + log.read_text()[-5000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    return question, records, summary, proc, log


@pytest.mark.slow
def test_vllm_answers_mt_bench_coherently(vllm_run):
    question, records, summary, _, _ = vllm_run
    assert summary["requests"] == 2 and summary["output_tokens"] > 0
    answer = records[0]["output"]
    assert records[0]["output_tokens"] >= 32
    assert answer.strip()
    for marker in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert marker not in answer
    words = re.findall(r"\S+", answer)
    assert len(words) >= 20
    ascii_words = [w for w in words if w.isascii()]
    assert len(ascii_words) >= 0.9 * len(words), answer
    assert len(re.findall(r"[A-Za-z]{2,}", answer)) >= 0.8 * len(words), answer
    # no degenerate repetition of one word
    lowered = [w.lower() for w in words]
    assert max(lowered.count(w) for w in set(lowered)) < 0.3 * len(words), answer
    # content words of the question, matched on a 5-letter stem (culture ~ cultural); places
    # in Hawaii count as mentioning it (greedy SmolLM2 starts with "the island of Oahu")
    content = {w for w in re.findall(r"[a-z]+", question["turns"][0].lower()) if len(w) > 3}
    content -= STOPWORDS
    answer_words = set(re.findall(r"[a-z]+", answer.lower()))
    stems = {w[:5] for w in answer_words}
    shared = {w for w in content if w[:5] in stems}
    if answer_words & HAWAII_PLACES:
        shared.add("hawaii")
    assert "hawaii" in shared, answer
    assert len(shared) >= 2, (shared, answer)


# A line of vLLM's logger: "INFO 12-04 03:00:00 [file.py:12] ..." (maybe after a prefix).
VLLM_LOG_LINE = re.compile(r"\b(DEBUG|INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d\b")


@pytest.mark.slow
def test_generate_prints_what_a_person_reads(vllm_run):
    """Answers, tokens/s, tau and the draft budget's choices on the terminal (plus a progress
    bar on stderr); vLLM's start-up chatter only in the log file, named in the first line."""
    _, records, summary, proc, log = vllm_run
    lines = proc.stdout.splitlines()
    assert lines[0] == f"generate: vLLM's log goes to {log} (--verbose to print it here)"
    assert not VLLM_LOG_LINE.search(proc.stdout), proc.stdout
    assert not VLLM_LOG_LINE.search(proc.stderr), proc.stderr[-3000:]
    assert "Processed prompts: 100%" in proc.stderr  # vLLM's tqdm bar
    assert sum(line.startswith("    => ") for line in lines) == len(records) == 2
    assert any(line.endswith(")") and " tokens/s " in line for line in lines), lines
    assert any(line.startswith("generate: Medusa tau ") for line in lines), lines
    budget = next(line for line in lines if line.startswith("generate: draft budget (auto)"))
    assert "of 16 tree nodes" in budget, budget
    assert sum(summary["draft_budget"]["steps_by_nodes"].values()) > 0, summary
    assert len(lines) < 15, lines
    logged = log.read_text()
    assert len(VLLM_LOG_LINE.findall(logged)) > 20
    assert "Medusa tree: 16 nodes" in logged and "K/V packing of CPU ISA" in logged


@pytest.mark.slow
def test_vllm_greedy_matches_transformers(vllm_run, smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_medusa.data import render_chat

    _, records, _, _, _ = vllm_run
    record = records[1]
    assert record["prompt"] == SHORT_PROMPT
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(render_chat(tok, SHORT_PROMPT), add_special_tokens=False, return_tensors="pt")
    assert ids.input_ids.shape[1] == record["prompt_tokens"]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=COMPARE_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    hf_tokens = out[0, ids.input_ids.shape[1] :].tolist()
    vllm_tokens = record["output_token_ids"][:COMPARE_TOKENS]
    assert len(hf_tokens) == COMPARE_TOKENS
    assert vllm_tokens == hf_tokens, (tok.decode(vllm_tokens), tok.decode(hf_tokens))
