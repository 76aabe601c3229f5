"""Small, named patches of vLLM 0.32's V1 ``GPUModelRunner`` (also the CPU runner's base).

Each wrapper defers to vLLM's own method unless the runner's drafter is a
:class:`TreeMedusaProposer`, i.e. unless the engine serves tree Medusa.

- ``MedusaProposer`` (name in ``gpu_model_runner``): -> :class:`TreeMedusaProposer`.
- ``GPUModelRunner._prepare_inputs``: tree positions (context + node depth) and the tree
  attention plan for the step.
- ``GPUModelRunner._sample``: longest-path greedy acceptance over each request's tree instead
  of the chain rejection sampler (typical acceptance or exact tree rejection sampling for
  sampled requests, :mod:`.tree_sampling`), then KV compaction of the accepted nodes.
- ``InputProcessor._validate_params`` (:mod:`.tree_sampling`): bad per-request Medusa options
  in ``SamplingParams.extra_args`` are a client error (400), naming the value.
- ``GPUModelRunner.propose_draft_token_ids``: heads read the hidden state of the last accepted
  node (not the chain's last row) and fill the tree; the draft budget picks how much of it.
- ``GPUModelRunner._input_fits_in_drafter``: always true for the tree drafter. vLLM's fallback
  (a request near ``max_model_len``) would give *every* request ``N`` zero drafts and skip the
  proposer; the tree proposer decides which requests draft, and the scheduler already cuts
  each request's drafts to what fits (a breadth-first prefix of the tree is a tree).
- ``Worker.compile_or_warm_up_model`` (and the CPU worker's override): before it, the built
  model's attention layers, KV-cache groups and each CPU ISA's K/V packing are checked
  (:mod:`.startup_checks`); afterwards, the proposer times forward passes for the draft budget's step-cost table.
- ``Scheduler.__init__`` (:mod:`.scheduler_patches`): no placeholder drafts for new requests.
- ``EngineArgs.create_speculative_config`` (:mod:`.config_patches`): a missing
  ``num_speculative_tokens`` is derived from the tree.
- ``GPUModelRunner.sample_tokens``, ``Scheduler.update_from_output``,
  ``EngineCore.post_step`` (:mod:`.engine_patches`): the drafts ride on the step's output
  instead of a second worker RPC per step.

Otherwise the scheduler is left as it is: it takes per-request draft lists of any length,
rolls ``num_computed_tokens`` back by the number of rejected drafts (correct once the accepted
nodes' KV sits in consecutive slots) and stops requests token by token.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker import gpu_model_runner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_medusa.core.acceptance import longest_accepted_path
from vllm_medusa.integration import startup_checks, tree_attention, tree_kernels, tree_sampling
from vllm_medusa.integration.proposer import TreeMedusaProposer, request_can_speculate

logger = init_logger(f"vllm.{__name__}")
PLACEHOLDER_TOKEN_ID = -1


def _tree_drafter(runner) -> TreeMedusaProposer | None:
    drafter = getattr(runner, "drafter", None)
    return drafter if isinstance(drafter, TreeMedusaProposer) else None


def speculating_requests(runner, num_reqs: int) -> np.ndarray:
    """``[num_reqs]`` bool, in batch order: which requests tree verification may draft for."""
    requests = runner.requests
    options = runner.drafter.options
    return np.array(
        [
            request_can_speculate(requests[req_id].sampling_params, options)
            for req_id in runner.input_batch.req_ids[:num_reqs]
        ],
        dtype=bool,
    )


def real_draft_counts(runner, spec_md) -> np.ndarray:
    """``[B]`` draft tokens each request really drafted: 0 for requests that must not
    speculate and for placeholder drafts (negative ids) that vLLM may schedule on its own."""
    num_draft = np.asarray(spec_md.num_draft_tokens, dtype=np.int64)
    first = np.cumsum(num_draft) - num_draft
    has = num_draft > 0
    real = np.zeros_like(has)
    draft_ids = spec_md.draft_token_ids
    real[has] = draft_ids[torch.from_numpy(first[has])].cpu().numpy() >= 0
    real &= speculating_requests(runner, len(num_draft))
    return np.where(real, num_draft, 0)


# ---- _prepare_inputs: positions and attention plan -------------------------------------------


def _tree_rows(runner, spec_md, num_scheduled_tokens: np.ndarray):
    """Per request: global row of the tree root, position of the root, number of nodes."""
    num_reqs = runner.input_batch.num_reqs
    num_draft = np.asarray(spec_md.num_draft_tokens, dtype=np.int64)
    query_end = runner.query_start_loc.np[1 : num_reqs + 1].astype(np.int64)
    root_rows = query_end - 1 - num_draft
    num_computed = runner.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
    root_pos = num_computed + num_scheduled_tokens.astype(np.int64) - 1 - num_draft
    return root_rows, root_pos, num_draft


def build_tree_plan(runner, drafter: TreeMedusaProposer, spec_md, num_scheduled_tokens):
    """Set tree positions; return the attention plan (None when the kernel is exact)."""
    root_rows, root_pos, num_draft = _tree_rows(runner, spec_md, num_scheduled_tokens)
    total = int(num_draft.sum())
    if total == 0:
        return None
    # Node m of a request sits at row root_row + m and position root_pos + depth(m).
    req = np.repeat(np.arange(len(num_draft)), num_draft)  # [total]
    node = np.arange(total) - (np.cumsum(num_draft) - num_draft)[req] + 1
    rows = torch.from_numpy(root_rows[req] + node)
    runner.positions[rows] = torch.from_numpy(root_pos[req] + drafter.node_depths_np[node]).to(
        runner.positions.dtype
    )
    block_table = runner.input_batch.block_table[0]
    return drafter.mask_layout.plan(
        root_rows,
        root_pos,
        num_draft,
        block_table.block_table.np,
        block_table.block_size,
        runner.device,
    )


def _count_step(runner, drafter: TreeMedusaProposer, spec_md) -> None:
    """Count a step that verifies drafts, and whether a prompt prefill shares it."""
    if not any(spec_md.num_draft_tokens):
        return
    batch = runner.input_batch
    n = batch.num_reqs
    prefilling = batch.num_computed_tokens_cpu[:n] < batch.num_prompt_tokens[:n]
    drafter.counters.tree_steps += 1
    drafter.counters.tree_steps_with_prefill += int(prefilling.any())


def _wrap_prepare_inputs(original):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        tree_attention.set_plan(None)
        drafter = _tree_drafter(self)
        if drafter is not None:
            drafter.step_started()
        result = original(self, scheduler_output, num_scheduled_tokens)
        spec_md = result[1]
        if drafter is not None and spec_md is not None:
            plan = build_tree_plan(self, drafter, spec_md, num_scheduled_tokens)
            tree_attention.set_plan(plan)
            _count_step(self, drafter, spec_md)
        return result

    _prepare_inputs.__vllm_medusa_patch__ = True
    return _prepare_inputs


# ---- _sample: tree acceptance and KV compaction ---------------------------------------------


def tree_accept_greedy(logits, spec_md, drafter: TreeMedusaProposer, verify=None):
    """Greedy longest-path acceptance for every request of the batch; ``verify`` ``[B]`` bool
    (default all): requests whose drafts may be accepted at all.

    Returns (num_accepted [B], accepted_nodes [B, D], accepted_tokens [B, D], last_node [B],
    first_row [B]) where ``first_row`` is each request's first logits row (its tree root).
    """
    device = logits.device
    num_draft = torch.tensor(spec_md.num_draft_tokens, dtype=torch.long, device=device)
    b = num_draft.shape[0]
    n_nodes = drafter.tree.num_nodes
    first_row = torch.cumsum(num_draft + 1, 0) - (num_draft + 1)
    node_idx = torch.arange(n_nodes + 1, device=device)
    present = node_idx[None, :] <= num_draft[:, None]  # [B, N+1]
    rows = torch.where(present, first_row[:, None] + node_idx[None, :], first_row[:, None])
    argmax = tree_kernels.argmax_rows(logits)[rows]  # [B, N+1]
    # Draft tokens in flattened order; scatter them into [B, N+1] node slots.
    node_tokens = torch.full(
        (b, n_nodes + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=device
    )
    is_draft = present.clone()
    is_draft[:, 0] = False
    node_tokens[is_draft] = spec_md.draft_token_ids.to(torch.long)
    parents = drafter.buffers.parents.clamp(min=0)
    node_ok = (node_tokens == argmax[:, parents]) & is_draft
    if verify is not None:
        node_ok &= verify[:, None]
    num_acc, nodes, tokens, last = longest_accepted_path(node_ok, node_tokens, drafter.buffers)
    return num_acc, nodes, tokens, last, first_row


def emitted_logprobs(sampler, logits: torch.Tensor) -> torch.Tensor:
    """What vLLM's sampler reports as logprobs for these rows under its ``logprobs_mode``
    (the raw modes; the processed ones are refused at engine start)."""
    if sampler.logprobs_mode == "raw_logits":
        return logits.to(torch.float32, copy=True)
    return sampler.compute_logprobs(logits)


def compact_accepted_kv(runner, spec_md, nodes, num_acc, first_row) -> None:
    """Move the K/V of accepted nodes from their tree slots to consecutive positions.

    Node ``m`` at depth ``d`` was written at position ``root + m``; plain decoding would have
    it at ``root + d``. Along a path ``m >= d`` and ``m`` strictly increases, and all sources
    are read before any destination is written, so one gather/scatter per layer is safe.
    """
    depth_idx = torch.arange(1, nodes.shape[1] + 1, device=nodes.device)
    move = (nodes >= 0) & (nodes != depth_idx[None, :])
    if not bool(move.any()):
        return
    req = torch.nonzero(move)[:, 0]
    root_logit_rows = first_row[req]
    src_logit_rows = root_logit_rows + nodes[move]
    dst_logit_rows = root_logit_rows + depth_idx.expand_as(nodes)[move]
    logits_indices = spec_md.logits_indices.to(torch.long)
    slot_mapping = runner.input_batch.block_table[0].slot_mapping.gpu
    src_slots = slot_mapping[logits_indices[src_logit_rows]]
    dst_slots = slot_mapping[logits_indices[dst_logit_rows]]
    layers = _attention_layers(runner)
    if tree_kernels.use_compiled():
        # One call for every layer; pairs are in increasing depth per request (safe in order).
        tree_kernels.compiled().copy_kv_slots(
            [kv for _, kv in layers], src_slots.to(torch.int64), dst_slots.to(torch.int64)
        )
        return
    for layer, kv_cache in layers:
        key, value = tree_attention.read_kv(kv_cache, src_slots)
        tree_attention.write_kv(layer, kv_cache, key, value, dst_slots)


def _attention_layers(runner):
    cached = getattr(runner, "_vllm_medusa_attention_layers", None)
    if cached is None:
        groups = runner.kv_cache_config.kv_cache_groups
        ctx = runner.compilation_config.static_forward_context
        cached, seen = [], set()
        for name in groups[0].layer_names:
            layer = ctx[name]
            kv = layer.kv_cache
            kv = kv[0] if isinstance(kv, (list, tuple)) else kv
            if kv.data_ptr() in seen:  # layers that share a KV cache are moved once
                continue
            seen.add(kv.data_ptr())
            cached.append((layer, kv))
        runner._vllm_medusa_attention_layers = cached
    return cached


def _wrap_sample(original):
    @functools.wraps(original)
    def _sample(self, logits, spec_decode_metadata):
        drafter = _tree_drafter(self)
        tree_attention.set_plan(None)
        if drafter is None or spec_decode_metadata is None:
            return original(self, logits, spec_decode_metadata)
        spec_md = spec_decode_metadata
        sampling_metadata = self.input_batch.sampling_metadata
        self.input_batch.update_async_output_token_ids()

        real_drafts = real_draft_counts(self, spec_md)
        verify = torch.from_numpy(real_drafts > 0).to(logits.device)
        num_acc, nodes, tokens, last, first_row = tree_accept_greedy(
            logits, spec_md, drafter, verify
        )
        # Sampled requests: typical / exact acceptance replaces greedy for them.
        sampled_acc = tree_sampling.accept_sampled_requests(
            self, drafter, logits, spec_md, real_drafts, first_row
        )
        if sampled_acc is not None:
            num_acc, nodes, tokens, last = sampled_acc.merge(num_acc, nodes, tokens, last)
        tree_sampling.record_accepted(drafter, num_acc)
        drafter.record_acceptance(real_drafts, nodes.cpu().numpy())
        bonus_rows = first_row + last
        # The bonus token goes through vLLM's sampler: requests without drafts (sampling,
        # penalties, ...) are sampled exactly as plain decoding would sample them.
        bonus_out = self.sampler(logits=logits[bonus_rows], sampling_metadata=sampling_metadata)
        bonus = bonus_out.sampled_token_ids[:, 0].to(torch.long)
        if sampled_acc is not None:
            bonus = sampled_acc.merge_bonus(bonus)  # from the residual / last accepted node
        b, depth = tokens.shape
        sampled = torch.full(
            (b, depth + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=logits.device
        )
        sampled[:, :depth] = tokens
        sampled[torch.arange(b, device=logits.device), num_acc] = bonus

        logprobs_tensors = None
        if bonus_out.logprobs_tensors is not None:
            # Each emitted token's logprob comes from the node before it on the path.
            path = torch.cat([torch.zeros_like(last)[:, None], nodes.clamp(min=0)], dim=1)
            emit_rows = (first_row[:, None] + path).reshape(-1)
            logprobs = emitted_logprobs(self.sampler, logits[emit_rows])
            logprobs_tensors = self.sampler.gather_logprobs(
                logprobs, sampling_metadata.max_num_logprobs, sampled.clamp(min=0).reshape(-1)
            )

        compact_accepted_kv(self, spec_md, nodes, num_acc, first_row)
        self._vllm_medusa_last_rows = bonus_rows
        return SamplerOutput(
            sampled_token_ids=sampled.to(torch.int32), logprobs_tensors=logprobs_tensors
        )

    _sample.__vllm_medusa_patch__ = True
    return _sample


# ---- propose_draft_token_ids: heads at the last accepted node -------------------------------


def _tree_drafts(runner, drafter, sampled_token_ids, sample_hidden_states, spec_decode_metadata):
    b = len(sampled_token_ids)
    drafts: list[list[int]] = [[] for _ in range(b)]
    can_speculate = speculating_requests(runner, b)
    eligible = [i for i in range(b) if sampled_token_ids[i] and can_speculate[i]]
    num_nodes = drafter.nodes_for_step(len(eligible), b - len(eligible)) if eligible else 0
    if num_nodes == 0:
        return drafts
    if spec_decode_metadata is None:
        rows = torch.tensor(eligible, device=sample_hidden_states.device)
    else:
        rows = runner._vllm_medusa_last_rows[eligible]
    # The root of each tree is the token just sampled (sequential heads read it).
    bonus = torch.tensor(
        [sampled_token_ids[i][-1] for i in eligible], device=sample_hidden_states.device
    )
    # A breadth-first prefix of the tree is a tree (every node's parent comes before it).
    tree_tokens = drafter.propose_tree(sample_hidden_states[rows], num_nodes, bonus).tolist()
    for i, tokens in zip(eligible, tree_tokens, strict=True):
        drafts[i] = tokens
    return drafts


def _wrap_propose(original):
    @functools.wraps(original)
    def propose_draft_token_ids(
        self,
        scheduler_output,
        sampled_token_ids,
        sampling_metadata,
        hidden_states,
        sample_hidden_states,
        aux_hidden_states,
        spec_decode_metadata,
        common_attn_metadata,
        slot_mappings,
    ):
        drafter = _tree_drafter(self)
        if drafter is None:
            return original(
                self,
                scheduler_output,
                sampled_token_ids,
                sampling_metadata,
                hidden_states,
                sample_hidden_states,
                aux_hidden_states,
                spec_decode_metadata,
                common_attn_metadata,
                slot_mappings,
            )
        self._draft_probs = None
        self._draft_prob_req_ids = None
        drafts = _tree_drafts(
            self, drafter, sampled_token_ids, sample_hidden_states, spec_decode_metadata
        )
        num_draft = (
            np.zeros(len(sampled_token_ids), dtype=np.int64)
            if spec_decode_metadata is None
            else np.asarray(spec_decode_metadata.num_draft_tokens, dtype=np.int64)
        )
        drafter.step_finished(scheduler_output.total_num_scheduled_tokens, num_draft)
        return drafts

    propose_draft_token_ids.__vllm_medusa_patch__ = True
    return propose_draft_token_ids


def _wrap_input_fits_in_drafter(original):
    @functools.wraps(original)
    def _input_fits_in_drafter(self, common_attn_metadata):
        if _tree_drafter(self) is None:
            return original(self, common_attn_metadata)
        return common_attn_metadata is not None

    _input_fits_in_drafter.__vllm_medusa_patch__ = True
    return _input_fits_in_drafter


def _wrap_compile_or_warm_up(original):
    @functools.wraps(original)
    def compile_or_warm_up_model(self):
        if _tree_drafter(self.model_runner) is not None:
            isas = startup_checks.check_model(self.model_runner)
            if isas:
                logger.info("Medusa tree attention: K/V packing of CPU ISA %s checked", isas)
        result = original(self)
        drafter = _tree_drafter(self.model_runner)
        if drafter is not None:
            drafter.calibrate_step_cost(self.model_runner)
        return result

    compile_or_warm_up_model.__vllm_medusa_patch__ = True
    return compile_or_warm_up_model


def _worker_counters(worker) -> dict | None:
    drafter = _tree_drafter(worker.model_runner)
    return None if drafter is None else drafter.counters.as_dict()


def _patch_workers() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.worker import gpu_worker

    gpu_worker.Worker.vllm_medusa_counters = _worker_counters  # the CPU worker inherits it
    workers = [gpu_worker.Worker]
    if current_platform.is_cpu():
        from vllm.v1.worker import cpu_worker

        workers.append(cpu_worker.CPUWorker)
    for cls in workers:
        # Only where the class defines the method itself (the CPU worker overrides it).
        if "compile_or_warm_up_model" in cls.__dict__:
            cls.compile_or_warm_up_model = _wrap_compile_or_warm_up(cls.compile_or_warm_up_model)


def patch_model_runner() -> None:
    """Install the runner patches once per process."""
    if getattr(GPUModelRunner._sample, "__vllm_medusa_patch__", False):
        return
    _patch_workers()
    gpu_model_runner.MedusaProposer = TreeMedusaProposer
    GPUModelRunner._prepare_inputs = _wrap_prepare_inputs(GPUModelRunner._prepare_inputs)
    GPUModelRunner._sample = _wrap_sample(GPUModelRunner._sample)
    GPUModelRunner.propose_draft_token_ids = _wrap_propose(GPUModelRunner.propose_draft_token_ids)
    GPUModelRunner._input_fits_in_drafter = _wrap_input_fits_in_drafter(
        GPUModelRunner._input_fits_in_drafter
    )
