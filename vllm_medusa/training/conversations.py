"""The self-distillation file: one JSON object per line,
``{"index": i, "prompt_ids": [...], "answer_ids": [...]}``.

``index`` is the prompt's position in the prompt list it was generated from (resuming skips
the indices already present); ``prompt_ids`` is the prompt rendered with the chat template
and tokenized; ``answer_ids`` is the base model's answer (token ids, end-of-turn included
when the model produced one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ConversationFileError(ValueError):
    """A malformed self-distillation file."""


@dataclass(frozen=True)
class Conversation:
    index: int
    prompt_ids: list[int]
    answer_ids: list[int]

    def to_json(self) -> str:
        return json.dumps(
            {"index": self.index, "prompt_ids": self.prompt_ids, "answer_ids": self.answer_ids},
            separators=(",", ":"),
        )


def _parse(line: str, where: str) -> Conversation:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConversationFileError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ConversationFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt_ids", "answer_ids"):
        ids = obj.get(key)
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
        ):
            raise ConversationFileError(
                f"{where}: '{key}' must be a list of non-negative token ids"
            )
    index = obj.get("index", -1)
    if not isinstance(index, int) or isinstance(index, bool):
        raise ConversationFileError(f"{where}: 'index' must be an integer")
    return Conversation(index, obj["prompt_ids"], obj["answer_ids"])


def read_conversations(path: str | Path, *, repair_tail: bool = False) -> list[Conversation]:
    """All conversations in ``path``.

    A last line without its newline is what an interrupted writer leaves behind: with
    ``repair_tail`` it is dropped from the file when incomplete (so appending can go on),
    otherwise it is an error like any other malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversationFileError(f"distillation file {path} does not exist")
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    out: list[Conversation] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.decode("utf-8", errors="replace").strip()
        if line:
            out.append(_parse(line, f"{path}:{lineno}"))
    if tail.strip():
        where = f"{path}:{len(lines) + 1}"
        try:
            out.append(_parse(tail.decode("utf-8", errors="replace"), where))
            if repair_tail:
                with path.open("ab") as f:
                    f.write(b"\n")
        except ConversationFileError:
            if not repair_tail:
                raise
            with path.open("r+b") as f:
                f.truncate(len(data) - len(tail))
    return out


def append_conversations(path: str | Path, conversations: list[Conversation]) -> None:
    """Append whole lines and flush (a crash loses at most a partial last line)."""
    with Path(path).open("a") as f:
        for c in conversations:
            f.write(c.to_json() + "\n")
        f.flush()
