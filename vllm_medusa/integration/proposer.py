"""Tree Medusa proposer: replaces vLLM's top-1 chain ``MedusaProposer``.

It loads heads in any supported checkpoint format with this project's loader (biases kept)
and fills the configured token tree from the last accepted token's hidden state; the
flattened tree (breadth-first) becomes a request's draft tokens. Medusa-1 heads: the top-k
of every head at once. Sequential heads (:mod:`vllm_medusa.core.sequential_heads`): depth by
depth, each internal node's head reading its path (the bonus token first) through the base
model's input embedding.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.spec_decode.medusa import MedusaProposer

from vllm_medusa.core.checkpoint import load_heads, read_tree_file
from vllm_medusa.core.draft_budget import (
    NodeAcceptance,
    StepCostModel,
    VerifyOverhead,
    choose_num_nodes,
)
from vllm_medusa.core.heads import MedusaHeads
from vllm_medusa.core.sequential_heads import SequentialHeads, SequentialTreePlan
from vllm_medusa.core.tree import MedusaTree, TreeError, chain_paths
from vllm_medusa.integration import draft_gemm, startup_checks, tree_kernels, tree_sampling
from vllm_medusa.integration.options import MedusaConfigError, MedusaTreeOptions
from vllm_medusa.integration.tree_attention import TreeMaskLayout

# Under vLLM's logger, so that messages reach its handler and format.
logger = init_logger(f"vllm.{__name__}")
# Steps between draft-budget summaries in the log.
BUDGET_LOG_EVERY = int(os.environ.get("VLLM_MEDUSA_BUDGET_LOG_EVERY", "1000"))
# A step cycle (step start to the next step's start) this many times the worker's own time
# had the engine idle in between (no requests): its worker time stands for the cycle.
IDLE_GAP_FACTOR = 4.0

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below it decode greedily


def resolve_tree(options: MedusaTreeOptions, heads_dir: Path, num_heads: int) -> MedusaTree:
    spec = options.tree
    try:
        if spec is None:
            paths = read_tree_file(heads_dir)
            if paths is not None:
                return MedusaTree.from_paths(
                    paths, num_heads=num_heads, source=str(heads_dir / "tree.json")
                )
            return MedusaTree.from_paths(chain_paths(num_heads), num_heads=num_heads)
        return MedusaTree.resolve(spec, num_heads=num_heads)
    except TreeError as e:
        raise MedusaConfigError(f"invalid Medusa tree: {e}") from e


def request_can_speculate(sampling_params, options: MedusaTreeOptions | None = None) -> bool:
    """Whether tree verification serves this request exactly as it would decode plainly.

    Greedy requests: greedy verification accepts a draft when it equals the argmax of the raw
    logits, which is what the request decodes only when nothing in vLLM 0.32's V1 sampler
    changes the argmax for it. Sampled requests (under ``acceptance`` ``typical`` or
    ``exact``, engine-wide or per request, :mod:`.tree_sampling`): the target distribution at
    every node is the raw logits under the request's temperature, top-k, top-p and min-p, so
    nothing else may shape it. Audited against ``Sampler.forward`` /
    ``apply_logits_processors``: allowed-token mask, bad words, the non-argmax-invariant
    logits processors (``min_tokens``; ``logit_bias`` is refused by vLLM with speculative
    decoding, and so are engine-level custom logits processors), penalties and the thinking
    token budget; besides, trace replay forces tokens and structured output masks the
    logits. ``min_p``, ``top_p`` and ``top_k`` keep the argmax; watermarking needs the V2
    runner, which does not serve Medusa. ``logprob_token_ids`` (generative scoring) is
    left out too: its logprobs come from the sampler's own path.

    Requests outside this set get no drafts and are decoded plainly, which is always correct.
    """
    sp = sampling_params
    if sp is None:
        return False
    if sp.temperature >= _GREEDY_EPS:
        if options is None or tree_sampling.request_mode(sp, options) == "greedy":
            return False
    if sp.presence_penalty != 0 or sp.frequency_penalty != 0 or sp.repetition_penalty != 1:
        return False
    if sp.logit_bias or sp.allowed_token_ids or sp.bad_words or sp._bad_words_token_ids:
        return False
    if sp.min_tokens or sp.thinking_token_budget is not None:
        return False
    if sp.trace_decode_token_ids or sp.logprob_token_ids:
        return False
    return sp.structured_outputs is None


def _token_grid(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, then ``limit`` (at least two points)."""
    return sorted({1, 2, *[2**i for i in range(2, 16) if 2**i < limit], max(limit, 2)})


def _best_time(fn, arg: int, sync) -> float:
    """Fastest of a few timed calls after one warm-up call (noise only adds time)."""
    times = []
    for _ in range(5 if arg <= 64 else 3):
        sync()
        start = time.perf_counter()
        fn(arg)
        sync()
        times.append(time.perf_counter() - start)
    return min(times[1:])


class TreeMedusaProposer(MedusaProposer):
    """Drafts a token tree per request from Medusa heads."""

    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        self.options = MedusaTreeOptions.from_additional_config(vllm_config.additional_config)
        self.heads_dir = Path(self.spec_config.model)
        model_config = vllm_config.model_config
        # Loading the heads here (a few MB) makes every mismatch fail at engine start.
        self.heads: MedusaHeads | SequentialHeads = load_heads(
            self.heads_dir,
            dtype=model_config.dtype,
            expected_hidden_size=model_config.get_hidden_size(),
            expected_vocab_size=model_config.get_vocab_size(),
        )
        self.tree = resolve_tree(self.options, self.heads_dir, self.heads.num_heads)
        if self.num_speculative_tokens != self.tree.num_nodes:
            raise MedusaConfigError(
                f"the Medusa tree has {self.tree.num_nodes} nodes but "
                f"speculative_config.num_speculative_tokens is {self.num_speculative_tokens}: "
                f"set num_speculative_tokens={self.tree.num_nodes} (one draft token per node)"
            )
        startup_checks.check_engine(vllm_config, self.tree, self.options.draft_budget)
        self.buffers = self.tree.buffers(device)
        self.sequential = isinstance(self.heads, SequentialHeads)
        self.sequential_plan = (
            SequentialTreePlan.build(self.tree, device) if self.sequential else None
        )
        self.embed_input_ids = None  # the base model's input embedding (sequential heads)
        self.vocab_size = model_config.get_vocab_size()
        self.base_compute_logits = None
        # Host-side copies for building per-step tree layouts.
        self.node_depths_np = np.asarray(self.tree.depths, dtype=np.int64)
        self.mask_layout = TreeMaskLayout(self.buffers.ancestor_mask.cpu().numpy())
        if len(self.mask_layout.fix_nodes) and tree_kernels.use_compiled():
            # Built (or loaded from the per-machine cache) now, so a build failure stops the
            # engine at start; chains need no tree attention and no compaction.
            start = time.perf_counter()
            tree_kernels.compiled()
            logger.info(
                "Medusa tree attention: compiled CPU kernels ready in %.1f s",
                time.perf_counter() - start,
            )
        # Cost-aware draft budget (draft_budget="auto"): the cost tables are measured once the
        # engine's KV cache exists (calibrate_step_cost); until then the whole tree is drafted.
        self.node_acceptance = NodeAcceptance(self.tree.parents)
        self.verify_overhead = VerifyOverhead()
        self.step_cost: StepCostModel | None = None
        # Heads + tree fill by drafting requests, for the first head only and for all the
        # tree's heads (a shallow prefix runs fewer heads; interpolated by depth).
        self.draft_cost_first_head: StepCostModel | None = None
        self.draft_cost_all_heads: StepCostModel | None = None
        self.prefix_depth = np.array(
            [self.buffers.depth_of_prefix(n) for n in range(self.tree.num_nodes + 1)]
        )
        self._all_prefixes = np.arange(self.tree.num_nodes + 1)
        self._step_start: float | None = None
        self._pending_step: _DecodeStep | None = None  # learnt from when the next one starts
        self._drafted_this_step = (0, 0)  # (requests, nodes) drafted for the next step
        self._stats = _BudgetStats(self.tree.num_nodes)
        self.counters = TreeCounters.zeros(self.tree.num_nodes)
        logger.info(
            "Medusa tree: %d nodes (per depth %s), top-%d, from %s; %s heads; draft budget %s",
            self.tree.num_nodes,
            self.tree.nodes_per_depth(),
            self.tree.top_k,
            self.options.tree or "heads folder / default chain",
            "sequential" if self.sequential else "Medusa-1",
            self.options.draft_budget,
        )

    # ---- draft budget -------------------------------------------------------------------

    def drafting_seconds(self, num_drafting: int, num_nodes: np.ndarray) -> np.ndarray:
        """Predicted time of running the heads and filling the first ``num_nodes`` tree nodes
        for ``num_drafting`` requests (0 for no nodes)."""
        depth = self.prefix_depth[np.asarray(num_nodes)]
        first = float(self.draft_cost_first_head(num_drafting))
        full = float(self.draft_cost_all_heads(num_drafting))
        deepest = max(self.tree.depth, 2)
        return np.where(depth > 0, first + (full - first) * (depth - 1) / (deepest - 1), 0.0)

    def nodes_for_step(self, num_drafting: int, num_other: int) -> int:
        """How many tree nodes (breadth-first prefix) the drafting requests get this step."""
        if self.options.draft_budget == "full" or self.step_cost is None:
            n = self.tree.num_nodes
        else:
            self.node_acceptance.forget()
            self.verify_overhead.forget()
            extra = self.drafting_seconds(num_drafting, self._all_prefixes)
            extra = extra + self.verify_overhead.extra_seconds(num_drafting, self._all_prefixes)
            n = choose_num_nodes(
                num_drafting,
                num_other,
                self.node_acceptance.probabilities,
                self.step_cost,
                draft_seconds=extra,
                min_gain=self.options.draft_min_gain,
            )
            self._stats.choices[n] += 1
            if self._stats.choices.sum() >= BUDGET_LOG_EVERY:
                self._log_budget()
        self.counters.nodes_chosen[n] += 1
        self._drafted_this_step = (num_drafting if n else 0, n)
        return n

    def _log_budget(self) -> None:
        stats = self._stats
        logger.info(
            "Medusa draft budget: nodes drafted per step over the last %d steps %s; node "
            "acceptance %s; measured decode step [cycle, worker] %s ms with drafts to verify, "
            "%s ms without; "
            "verification overhead beyond the cost table %.2f ms/request + %.3f ms/node",
            int(stats.choices.sum()),
            {k: int(c) for k, c in enumerate(stats.choices) if c},
            np.round(self.node_acceptance.probabilities, 3).tolist(),
            stats.mean_ms(verifying=True),
            stats.mean_ms(verifying=False),
            self.verify_overhead.coef[2] * 1e3,
            self.verify_overhead.coef[3] * 1e3,
        )
        self._stats = _BudgetStats(self.tree.num_nodes)

    def record_acceptance(self, num_draft: np.ndarray, accepted_nodes: np.ndarray) -> None:
        """Feed one verification step back: drafted node counts ``[B]``, accepted node ids
        ``[B, D]`` (1-based tree nodes, -1 where nothing was accepted)."""
        self.counters.accepted_per_node += self.node_acceptance.observe_step(
            num_draft, accepted_nodes
        )

    def step_started(self) -> None:
        now = time.perf_counter()
        pending, self._pending_step = self._pending_step, None
        if pending is not None:
            self._learn_step(pending, cycle_seconds=now - pending.start)
        self._step_start = now

    def step_finished(self, num_tokens: int, num_draft_tokens: np.ndarray) -> None:
        """A step ended (its drafts for the next step are made): keep what it computed, to
        learn from its duration once the next step starts.

        ``num_tokens``: tokens the step computed; ``num_draft_tokens`` ``[R]``: draft tokens
        each of its ``R`` requests verified. Only pure decode steps (each request computes
        its last token plus its drafts) are used: a prefill's attention is not a decode cost.
        """
        start, self._step_start = self._step_start, None
        (drafting_reqs, drafted_nodes), self._drafted_this_step = self._drafted_this_step, (0, 0)
        if start is None or self.step_cost is None or self.options.draft_budget != "auto":
            return
        num_requests = len(num_draft_tokens)
        draft_tokens = int(num_draft_tokens.sum())
        if num_tokens != num_requests + draft_tokens or num_requests == 0:
            return
        predicted = float(self.step_cost(num_tokens))
        if drafted_nodes:
            predicted += float(self.drafting_seconds(drafting_reqs, np.array(drafted_nodes)))
        self._pending_step = _DecodeStep(
            start=start,
            worker_seconds=time.perf_counter() - start,
            num_requests=num_requests,
            num_verifying=int((num_draft_tokens > 0).sum()),
            num_draft_tokens=draft_tokens,
            predicted_seconds=predicted,
        )

    def _learn_step(self, step: _DecodeStep, cycle_seconds: float) -> None:
        """Learn from one decode step's whole cycle: from its start in this worker to the
        next step's start. Beyond the worker's own time, the cycle holds the engine core's
        scheduling and output processing (and, behind a server, the CPU they share with
        detokenizing and streaming), which grow with the tokens each step emits: a clock
        that stopped at the worker's end made drafting look cheaper than it is."""
        if cycle_seconds > IDLE_GAP_FACTOR * step.worker_seconds:
            cycle_seconds = step.worker_seconds  # the engine idled between the two steps
        self.verify_overhead.observe(
            step.num_requests,
            step.num_verifying,
            step.num_draft_tokens,
            cycle_seconds - step.predicted_seconds,
        )
        self._stats.add(cycle_seconds, step.worker_seconds, step.num_verifying > 0)

    @torch.inference_mode()
    def calibrate_step_cost(self, runner, max_tokens: int = 256) -> None:
        """Time the model's forward pass plus LM head at a few token counts.

        Attention is skipped by vLLM's dummy runs, so the table slightly under-states the cost
        of long contexts; beyond ``max_tokens`` it is extrapolated linearly (compute bound).
        """
        if self.options.draft_budget != "auto":
            return
        sched = runner.scheduler_config
        limit = min(
            runner.max_num_tokens, sched.max_num_seqs * (self.tree.num_nodes + 1), max_tokens
        )
        grid = _token_grid(limit)
        sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)

        def forward(num_tokens: int) -> None:
            hidden, _ = runner._dummy_run(num_tokens)
            runner.model.compute_logits(hidden[:num_tokens])

        def draft(depth: int):
            # The shortest prefix that reaches ``depth`` runs ``depth`` heads.
            num_nodes = int(np.searchsorted(self.prefix_depth, depth))

            def run(num_reqs: int) -> None:
                hidden = torch.zeros(
                    (num_reqs, self.hidden_size), dtype=self.dtype, device=self.device
                )
                bonus = torch.zeros(num_reqs, dtype=torch.long, device=self.device)
                self.propose_tree(hidden, num_nodes, bonus)

            return run

        step = [_best_time(forward, t, sync) for t in grid]
        self.step_cost = StepCostModel(grid, step)
        draft_grid = _token_grid(min(sched.max_num_seqs, max_tokens))
        self.draft_cost_first_head = StepCostModel(
            draft_grid, [_best_time(draft(1), b, sync) for b in draft_grid]
        )
        self.draft_cost_all_heads = StepCostModel(
            draft_grid, [_best_time(draft(self.tree.depth), b, sync) for b in draft_grid]
        )
        logger.info(
            "Medusa draft budget: step cost (ms) by tokens %s; drafting cost (ms) by requests, "
            "first head %s, all %d heads %s",
            {t: round(x * 1e3, 1) for t, x in zip(grid, step, strict=True)},
            {b: round(float(self.draft_cost_first_head(b)) * 1e3, 1) for b in draft_grid},
            self.tree.depth,
            {b: round(float(self.draft_cost_all_heads(b)) * 1e3, 1) for b in draft_grid},
        )

    def load_model(self, target_model: torch.nn.Module) -> None:
        if self.sequential:
            embed = getattr(target_model, "embed_input_ids", None) or getattr(
                target_model, "get_input_embeddings", None
            )
            if embed is None:
                raise MedusaConfigError(
                    f"{type(target_model).__name__} exposes no input embedding "
                    "(embed_input_ids): sequential heads need it to read their paths"
                )
            self.embed_input_ids = embed
        elif self.heads.config.shared_lm_head:
            if not hasattr(target_model, "compute_logits"):
                raise MedusaConfigError(
                    f"{type(target_model).__name__} has no compute_logits for heads that "
                    "share the base LM head"
                )
            # vLLM's own LM head (pre-packed oneDNN weights on CPU, vocab-parallel gather
            # under tensor parallelism): ~4x faster here than a plain matmul.
            self.base_compute_logits = target_model.compute_logits
        self.heads = self.heads.to(self.device).eval()
        if self.sequential:
            make_linear = draft_gemm.prepacked_linear_factory(self.device)
            self.heads.use_linear_kernels(make_linear)
            logger.info(
                "Medusa drafting GEMMs: %s",
                "vLLM's prepacked oneDNN" if make_linear else "torch F.linear",
            )

    @torch.inference_mode()
    def propose_tree(
        self,
        hidden_states: torch.Tensor,
        num_nodes: int | None = None,
        bonus_token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens of the first ``num_nodes`` tree nodes (default all) ``[B, n]`` from the
        hidden states ``[B, H]`` of the roots (and, for sequential heads, the roots' tokens
        ``[B]``: the bonus tokens); only the heads those nodes need run."""
        n = self.tree.num_nodes if num_nodes is None else num_nodes
        if self.sequential:
            if bonus_token_ids is None:
                raise ValueError("sequential heads need the bonus tokens of the roots")
            return self.heads.fill_tree(
                self.sequential_plan, hidden_states, bonus_token_ids, self.embed_input_ids, n
            )
        head_states = self.heads(hidden_states, num_heads=int(self.prefix_depth[n]))
        if self.heads.config.shared_lm_head:
            k, b, h = head_states.shape
            logits = self.base_compute_logits(head_states.reshape(k * b, h))
            logits = logits[:, : self.vocab_size].view(k, b, -1)
        else:
            logits = self.heads.compute_logits(head_states)
        top = logits.topk(self.tree.top_k, dim=-1).indices.permute(1, 0, 2)  # [B, k_heads, k]
        return self.buffers.fill(top, n)

    def propose(self, *args, **kwargs):  # pragma: no cover - guarded by the runner patch
        raise RuntimeError("TreeMedusaProposer is driven by the vllm-medusa runner patch")

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int) -> None:
        b = min(num_tokens, 8)
        hidden = torch.zeros((b, self.hidden_size), dtype=self.dtype, device=self.device)
        self.propose_tree(hidden, None, torch.zeros(b, dtype=torch.long, device=self.device))


@dataclass
class TreeCounters:
    """What tree Medusa did since engine start, in a few cumulative counts (cheap: a handful
    of integer additions per step). Read through the worker (``collective_rpc(
    "vllm_medusa_counters")``) by ``vllm-medusa generate`` and by the tests that must prove a
    path was taken."""

    tree_steps: int = 0  # steps that verified at least one request's drafts
    tree_steps_with_prefill: int = 0  # ... while another request of the step prefilled its prompt
    accepted_per_node: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [N]
    # [N + 1]: steps in which the drafting requests got the first n nodes (the draft budget's
    # choice; n = N every step under draft_budget="full")
    nodes_chosen: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    @classmethod
    def zeros(cls, num_nodes: int) -> TreeCounters:
        return cls(
            accepted_per_node=np.zeros(num_nodes, np.int64),
            nodes_chosen=np.zeros(num_nodes + 1, np.int64),
        )

    def as_dict(self) -> dict:
        return {
            "tree_steps": int(self.tree_steps),
            "tree_steps_with_prefill": int(self.tree_steps_with_prefill),
            "accepted_per_node": self.accepted_per_node.tolist(),
            "nodes_chosen": self.nodes_chosen.tolist(),
        }


@dataclass(frozen=True)
class _DecodeStep:
    """A pure decode step whose duration the draft budget learns from."""

    start: float  # perf_counter at the step's start
    worker_seconds: float  # the worker's own time (inputs, forward, acceptance, drafting)
    num_requests: int
    num_verifying: int
    num_draft_tokens: int
    predicted_seconds: float  # cost table + drafting table


class _BudgetStats:
    """What the draft budget did between two log lines."""

    def __init__(self, num_nodes: int):
        self.choices = np.zeros(num_nodes + 1, dtype=np.int64)
        self.seconds = np.zeros((2, 2))  # [without drafts to verify, with] x [cycle, worker]
        self.steps = np.zeros(2, dtype=np.int64)

    def add(self, cycle_seconds: float, worker_seconds: float, verifying: bool) -> None:
        self.seconds[int(verifying)] += (cycle_seconds, worker_seconds)
        self.steps[int(verifying)] += 1

    def mean_ms(self, verifying: bool) -> list[float] | None:
        """Mean [cycle, worker] ms of the steps with (or without) drafts to verify."""
        i = int(verifying)
        if not self.steps[i]:
            return None
        return np.round(self.seconds[i] / self.steps[i] * 1e3, 2).tolist()
