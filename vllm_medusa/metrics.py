"""Speculative-decoding summary from vLLM's counters (``LLM.get_metrics()`` or ``/metrics``).

vLLM counts, per verification step of a request with drafts ("a draft"), the draft tokens and
the accepted ones, plus accepted tokens per position. With a tree, position d means "depth
d + 1 was accepted", so the counters give the mean accepted length per step (tau) and its
distribution exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class SpecDecodeSummary:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verification step: accepted drafts + the bonus token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def accepted_length_distribution(self) -> list[float]:
        """P(exactly d draft tokens accepted in a step), d = 0 .. max depth."""
        if not self.num_drafts:
            return [1.0]
        at_least = [self.num_drafts] + list(self.accepted_per_position)
        while len(at_least) > 1 and at_least[-1] == 0:
            at_least.pop()
        exact = [
            at_least[d] - (at_least[d + 1] if d + 1 < len(at_least) else 0)
            for d in range(len(at_least))
        ]
        return [x / self.num_drafts for x in exact]

    def format(self) -> str:
        dist = ", ".join(f"{d}:{p:.2f}" for d, p in enumerate(self.accepted_length_distribution()))
        return (
            f"tau {self.tau:.3f} (mean tokens per verification step) over {self.num_drafts} "
            f"steps with drafts; {self.num_accepted_tokens}/{self.num_draft_tokens} draft tokens "
            f"accepted; accepted length distribution {{{dist}}}"
        )


def summarize_vllm_metrics(metrics) -> SpecDecodeSummary:
    """From ``LLM.get_metrics()`` (objects with ``name`` and ``value`` / ``values``)."""
    s = SpecDecodeSummary()
    for m in metrics:
        name = m.name
        if name == "vllm:spec_decode_num_drafts":
            s.num_drafts = int(m.value)
        elif name == "vllm:spec_decode_num_draft_tokens":
            s.num_draft_tokens = int(m.value)
        elif name == "vllm:spec_decode_num_accepted_tokens":
            s.num_accepted_tokens = int(m.value)
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            s.accepted_per_position = [int(v) for v in m.values]
    return s


_PROM_LINE = re.compile(r"^(vllm:spec_decode_[a-z_]+?)(?:_total)?(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def summarize_prometheus(text: str) -> SpecDecodeSummary:
    """From the text of a server's ``/metrics`` endpoint (summed over label sets)."""
    s = SpecDecodeSummary()
    per_pos: dict[int, int] = {}
    for line in text.splitlines():
        match = _PROM_LINE.match(line.strip())
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", int(float(match.group(3)))
        if name == "vllm:spec_decode_num_drafts":
            s.num_drafts += value
        elif name == "vllm:spec_decode_num_draft_tokens":
            s.num_draft_tokens += value
        elif name == "vllm:spec_decode_num_accepted_tokens":
            s.num_accepted_tokens += value
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            pos = re.search(r'position="(\d+)"', labels)
            if pos:
                per_pos[int(pos.group(1))] = per_pos.get(int(pos.group(1)), 0) + value
    s.accepted_per_position = [per_pos[i] for i in sorted(per_pos)]
    return s
