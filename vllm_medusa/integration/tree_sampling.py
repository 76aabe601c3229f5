"""Sampled requests with trees: typical acceptance and exact tree rejection sampling in vLLM.

Each request's acceptance mode is the engine's ``acceptance`` option
(``additional_config["medusa"]``), overridable per request through
``SamplingParams.extra_args`` (the OpenAI server's ``vllm_xargs`` extra body)::

    {"medusa_acceptance": "greedy" | "typical" | "exact",
     "medusa_typical_eps": 0.09, "medusa_typical_delta": 0.3}

Greedy requests (temperature 0) are verified greedily whatever the mode. A sampled request
speculates under ``typical`` or ``exact`` when the only sampling parameters that shape its
distribution are temperature, top-k and top-p (the target distribution at every tree node
is :func:`vllm_medusa.core.tree_sampling.target_probs` of the raw logits, as vLLM's sampler
would process them; vLLM refuses ``min_p`` and ``logit_bias`` with speculative decoding);
requests with penalties, allowed tokens, bad words, min_tokens, structured output, a
thinking budget, forced tokens or ``logprob_token_ids`` decode plainly (:func:`vllm_medusa.integration.proposer.request_can_speculate`). Under
``greedy`` sampled requests decode plainly.

Randomness: per request and step, one uniform per tree node and one exponential per
vocabulary entry, from the request's ``torch.Generator`` when it is seeded (vLLM's
``sampling_metadata.generators``): a seeded request gives the same output run to run as long
as it drafts the same trees (``draft_budget: full``; the ``auto`` budget sizes trees from
timings, which changes which random draw decides what, not the distribution).

Bad per-request values are refused by the input processor (:func:`patch_input_processor`),
i.e. with a 400 by the OpenAI server, naming the value; the engine itself never raises on
them (a request that slips through decodes plainly).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from vllm.logger import init_logger

from vllm_medusa.core.acceptance import typical_accept_probs
from vllm_medusa.core.tree_sampling import (
    SAMPLING_EPS,
    children_table,
    draw_noise,
    exact_tree_accept,
    target_probs,
)
from vllm_medusa.integration.options import (
    ACCEPTANCE_METHODS,
    MedusaTreeOptions,
    is_positive_number,
)

logger = init_logger(f"vllm.{__name__}")

ACCEPTANCE_KEY = "medusa_acceptance"
EPS_KEY = "medusa_typical_eps"
DELTA_KEY = "medusa_typical_delta"
REQUEST_KEYS = (ACCEPTANCE_KEY, EPS_KEY, DELTA_KEY)
STATS_LOG_EVERY = 1000  # verification steps between "tau by acceptance mode" log lines


class MedusaRequestError(ValueError):
    """A request's Medusa options (``SamplingParams.extra_args``) that cannot be served."""


@dataclass(frozen=True)
class RequestAcceptance:
    mode: str  # greedy | typical | exact
    eps: float
    delta: float


def request_acceptance(sampling_params, options: MedusaTreeOptions) -> RequestAcceptance:
    """The acceptance a request asks for: its ``extra_args`` over the engine's options.
    A greedy request (temperature 0) is ``greedy`` whatever it asks for."""
    extra = sampling_params.extra_args or {}
    mode = extra.get(ACCEPTANCE_KEY, options.acceptance)
    if mode not in ACCEPTANCE_METHODS:
        raise MedusaRequestError(
            f"unknown {ACCEPTANCE_KEY} {mode!r}; supported: {list(ACCEPTANCE_METHODS)}"
        )
    eps = extra.get(EPS_KEY, options.typical_eps)
    delta = extra.get(DELTA_KEY, options.typical_delta)
    for key, value in ((EPS_KEY, eps), (DELTA_KEY, delta)):
        if not is_positive_number(value):
            raise MedusaRequestError(f"{key} must be a number > 0, got {value!r}")
    if sampling_params.temperature < SAMPLING_EPS:
        mode = "greedy"
    return RequestAcceptance(mode, float(eps), float(delta))


def request_mode(sampling_params, options: MedusaTreeOptions) -> str:
    """``request_acceptance(...).mode``, or ``greedy`` for bad options (validated earlier)."""
    try:
        return request_acceptance(sampling_params, options).mode
    except MedusaRequestError:
        return "greedy"


# ---- the input processor: bad per-request options are a client error ------------------------


def _wrap_validate_params(original):
    @functools.wraps(original)
    def _validate_params(self, params, supported_tasks):
        result = original(self, params, supported_tasks)
        extra = getattr(params, "extra_args", None)
        spec = self.vllm_config.speculative_config
        if extra and any(k in extra for k in REQUEST_KEYS) and spec and spec.method == "medusa":
            from vllm.exceptions import VLLMValidationError

            options = MedusaTreeOptions.from_additional_config(self.vllm_config.additional_config)
            try:
                request_acceptance(params, options)
            except MedusaRequestError as e:
                raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        return result

    _validate_params.__vllm_medusa_patch__ = True
    return _validate_params


def patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if not getattr(InputProcessor._validate_params, "__vllm_medusa_patch__", False):
        InputProcessor._validate_params = _wrap_validate_params(InputProcessor._validate_params)


# ---- verification of sampled requests ---------------------------------------------------------


@dataclass
class SampledAcceptance:
    """Typical / exact results for the batch rows ``rows`` ``[S]`` (the others: greedy)."""

    rows: torch.Tensor
    num_accepted: torch.Tensor
    accepted_nodes: torch.Tensor
    accepted_tokens: torch.Tensor
    last_node: torch.Tensor
    bonus_token: torch.Tensor

    def merge(self, num_acc, nodes, tokens, last):
        """Greedy results for the whole batch with these rows replaced."""
        num_acc, nodes, tokens, last = num_acc.clone(), nodes.clone(), tokens.clone(), last.clone()
        num_acc[self.rows] = self.num_accepted
        nodes[self.rows] = self.accepted_nodes
        tokens[self.rows] = self.accepted_tokens
        last[self.rows] = self.last_node
        return num_acc, nodes, tokens, last

    def merge_bonus(self, bonus: torch.Tensor) -> torch.Tensor:
        bonus = bonus.clone()
        bonus[self.rows] = self.bonus_token
        return bonus


def _node_tokens(spec_md, num_nodes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafted tokens ``[B, N+1]`` (column 0 unused, -1 where absent) and ``present``."""
    num_draft = torch.tensor(spec_md.num_draft_tokens, dtype=torch.long, device=device)
    node_idx = torch.arange(num_nodes + 1, device=device)
    present = (node_idx[None, :] <= num_draft[:, None]) & (node_idx[None, :] > 0)
    tokens = torch.full((num_draft.shape[0], num_nodes + 1), -1, dtype=torch.long, device=device)
    tokens[present] = spec_md.draft_token_ids.to(torch.long)
    return tokens, present


def accept_sampled_requests(
    runner, drafter, logits, spec_md, real_drafts: np.ndarray, first_row: torch.Tensor
) -> SampledAcceptance | None:
    """Typical acceptance or exact tree rejection sampling for the batch's sampled requests
    that drafted (None when there are none). ``logits`` ``[T, V]``: every row of the step;
    ``first_row`` ``[B]``: each request's tree root row."""
    options = drafter.options
    req_ids = runner.input_batch.req_ids[: len(real_drafts)]
    params = [runner.requests[r].sampling_params for r in req_ids]
    modes = [request_mode(sp, options) if n > 0 else None for sp, n in zip(params, real_drafts)]
    _record_modes(drafter, modes)
    sel = [i for i, m in enumerate(modes) if m in ("typical", "exact")]
    if not sel:
        return None
    device = logits.device
    n_nodes = drafter.tree.num_nodes
    all_tokens, all_present = _node_tokens(spec_md, n_nodes, device)
    rows = torch.tensor(sel, dtype=torch.long, device=device)
    tokens, present = all_tokens[rows], all_present[rows]
    tokens[:, 0] = 0  # the root's own token is not verified
    s = len(sel)
    node_idx = torch.arange(n_nodes + 1, device=device)
    logit_rows = first_row[rows][:, None] + torch.where(present, node_idx, 0)[:, :]
    logit_rows[:, 0] = first_row[rows]
    sp = [params[i] for i in sel]
    per_row = n_nodes + 1
    temperature = torch.tensor([p.temperature for p in sp], device=device)
    top_k = top_p = None  # (min_p: vLLM refuses it with speculative decoding)
    if any(0 < p.top_k < logits.shape[-1] for p in sp):
        top_k = torch.tensor([p.top_k for p in sp], device=device).repeat_interleave(per_row)
    if any(p.top_p < 1.0 for p in sp):
        top_p = torch.tensor([p.top_p for p in sp], device=device).repeat_interleave(per_row)
    probs = target_probs(
        logits[logit_rows.reshape(-1)],
        temperature.repeat_interleave(per_row),
        top_k,
        top_p,
    ).view(s, per_row, -1)  # [S, N+1, V]

    generators = runner.input_batch.sampling_metadata.generators
    gens = {k: generators[i] for k, i in enumerate(sel) if i in generators}
    uniforms, expo = draw_noise(s, per_row, probs.shape[-1], gens, device)

    buffers = drafter.buffers
    out = {
        f: torch.empty(s, *shape, dtype=torch.long, device=device)
        for f, shape in (
            ("num_accepted", ()),
            ("accepted_nodes", (buffers.leaf_paths.shape[1] - 1,)),
            ("accepted_tokens", (buffers.leaf_paths.shape[1] - 1,)),
            ("last_node", ()),
            ("bonus_token", ()),
        )
    }
    for mode in ("typical", "exact"):
        part = [k for k, i in enumerate(sel) if modes[i] == mode]
        if not part:
            continue
        k = torch.tensor(part, dtype=torch.long, device=device)
        if mode == "typical":
            acc = [request_acceptance(sp[j], options) for j in part]
            res = typical_accept_probs(
                tokens[k],
                probs[k],
                buffers,
                torch.tensor([a.eps for a in acc], device=device),
                torch.tensor([a.delta for a in acc], device=device),
                expo[k],
                present[k],
            )
        else:
            children = getattr(drafter, "_vllm_medusa_children", None)
            if children is None:
                children = drafter._vllm_medusa_children = children_table(buffers)
            res = exact_tree_accept(
                tokens[k], probs[k], buffers, uniforms[k], expo[k], present[k], children
            )
        for f, t in out.items():
            t[k] = getattr(res, f)
    return SampledAcceptance(rows=rows, **out)


# ---- tau per acceptance mode ----------------------------------------------------------------


class ModeStats:
    """Verification steps and accepted draft tokens per acceptance mode."""

    def __init__(self):
        self.steps = dict.fromkeys(ACCEPTANCE_METHODS, 0)
        self.accepted = dict.fromkeys(ACCEPTANCE_METHODS, 0)
        self.pending: list[tuple[int, str]] = []  # (batch row, mode) of the current step
        self.since_log = 0

    def tau(self, mode: str) -> float | None:
        steps = self.steps[mode]
        return 1.0 + self.accepted[mode] / steps if steps else None


def mode_stats(drafter) -> ModeStats:
    stats = getattr(drafter, "_vllm_medusa_mode_stats", None)
    if stats is None:
        stats = drafter._vllm_medusa_mode_stats = ModeStats()
    return stats


def _record_modes(drafter, modes: list[str | None]) -> None:
    mode_stats(drafter).pending = [(i, m) for i, m in enumerate(modes) if m is not None]


def record_accepted(drafter, num_accepted: torch.Tensor) -> None:
    """After acceptance: count this step's verifications per mode; log now and then."""
    stats = mode_stats(drafter)
    if not stats.pending:
        return
    accepted = num_accepted.cpu().tolist()
    for i, mode in stats.pending:
        stats.steps[mode] += 1
        stats.accepted[mode] += accepted[i]
    stats.pending = []
    stats.since_log += 1
    if stats.since_log >= STATS_LOG_EVERY:
        stats.since_log = 0
        logger.info(
            "Medusa tau (tokens per verification step) by acceptance mode: %s",
            {m: round(t, 3) for m in ACCEPTANCE_METHODS if (t := stats.tau(m)) is not None},
        )
