"""Head training, evaluation and tree calibration (vllm_medusa.training)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_medusa.core.heads import MedusaConfig, MedusaHeads
from vllm_medusa.core.tree import MedusaTree
from vllm_medusa.training import train as train_mod
from vllm_medusa.training.calibrate import calibrate, grow_tree
from vllm_medusa.training.common import TrainingError
from vllm_medusa.training.conversations import (
    Conversation,
    ConversationFileError,
    append_conversations,
    read_conversations,
)
from vllm_medusa.training.evaluate import (
    Candidates,
    head_candidates,
    predicted_tau,
    rank_accuracy,
    simulate_tau,
)
from vllm_medusa.training.hidden import IGNORE, HiddenCache, compute_hidden
from vllm_medusa.training.loss import fused_head_loss
from vllm_medusa.training.train import TrainConfig, train_heads

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


def cyclic_cache(vocab: int = 16, n_convs: int = 6, length: int = 40, seed: int = 0):
    """Conversations following a fixed permutation cycle; hidden state at t = one-hot(token t).

    Token t + 2 + i is then a function of token t, so every head can be exact."""
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(vocab, generator=g).tolist()
    nxt = {cycle[j]: cycle[(j + 1) % vocab] for j in range(vocab)}
    tokens, pos, seq_end, conv = [], [], [], []
    for c in range(n_convs):
        start = len(tokens)
        tok = cycle[c % vocab]
        seq = []
        for _ in range(length):
            seq.append(tok)
            tok = nxt[tok]
        tokens += seq
        prompt = 3  # rows start at the last prompt token, as in compute_hidden
        for t in range(prompt - 1, length - 1):
            pos.append(start + t)
            seq_end.append(start + length)
            conv.append(c)
    tokens_t = torch.tensor(tokens)
    pos_t = torch.tensor(pos)
    hidden = torch.nn.functional.one_hot(tokens_t[pos_t], vocab).float()
    return HiddenCache(hidden, tokens_t, pos_t, torch.tensor(seq_end), torch.tensor(conv)), nxt


def heads_from(result) -> MedusaHeads:
    return result.heads


# ------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("shared", [True, False])
def test_fused_loss_matches_autograd(shared):
    torch.manual_seed(0)
    k, n, h, v = 3, 37, 8, 50
    states = torch.randn(k, n, h, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, dtype=torch.float64) if shared else torch.randn(k, v, h).double()
    w.requires_grad_(True)
    targets = torch.randint(0, v, (k, n))
    targets[1, 5:9] = IGNORE
    targets[2, :] = IGNORE  # a head with no target at all
    hw = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    out = fused_head_loss(
        states.detach(), w.detach(), targets, hw, chunk_rows=10, want_lm_grad=True
    )
    ref = 0.0
    for i in range(2):
        wi = w if shared else w[i]
        ref = ref + hw[i] * torch.nn.functional.cross_entropy(
            states[i] @ wi.t(), targets[i], ignore_index=IGNORE
        )
    ref.backward()
    assert torch.allclose(out.loss, ref.detach())
    assert torch.allclose(out.grad_states, states.grad)
    assert torch.allclose(out.grad_lm_head, w.grad)
    assert out.count.tolist() == [37, 33, 0]
    logits = torch.einsum("knh,kvh->knv", states.detach(), w.detach().expand(k, v, h))
    hits = ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum(1)
    assert out.correct.tolist() == hits.tolist()


# ------------------------------------------------------------------- offsets (learning)


@pytest.mark.parametrize("shared", [True, False])
def test_heads_learn_the_offsets_exactly(shared):
    vocab = 16
    cache, nxt = cyclic_cache(vocab)
    lm_head = torch.eye(vocab)
    cfg = TrainConfig(
        num_heads=4, shared_lm_head=shared, epochs=60, batch_tokens=64, lr=0.05, seed=1
    )
    result = train_heads(cache, lm_head, cfg, progress=False)
    heads = result.heads
    # targets computed independently of HiddenCache.targets: walk the cycle
    cand = head_candidates(
        heads, cache, None if not shared else lm_head, max_rank=1, progress=False
    )
    for row in range(cache.num_rows):
        p = int(cache.pos[row])
        tok = int(cache.tokens[p])
        for i in range(4):
            expect = tok
            for _ in range(2 + i):
                expect = nxt[expect]
            if p + 2 + i < int(cache.seq_end[row]):
                assert int(cache.targets(4)[row, i]) == expect
                assert int(cand.topk[row, i, 0]) == expect, (row, i)
    acc = rank_accuracy(cand)
    assert acc[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_targets_skip_the_end_of_each_conversation():
    cache, _ = cyclic_cache(n_convs=2, length=10)
    t = cache.targets(4)
    last = (cache.conv == 0).nonzero().max()
    # the last row of a conversation is position T-2: head 0 wants T, which does not exist
    assert t[last].tolist() == [IGNORE] * 4
    assert (t[last - 1] != IGNORE).tolist() == [True, False, False, False]


# ----------------------------------------------------------------------- checkpoints


def _params(heads):
    return {k: v.clone() for k, v in heads.state_dict().items()}


@pytest.mark.parametrize("shared", [True, False])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, shared):
    cache, _ = cyclic_cache()
    lm = torch.eye(16)
    base = dict(num_heads=3, shared_lm_head=shared, epochs=2, batch_tokens=32, lr=0.01, seed=3)
    full = train_heads(cache, lm, TrainConfig(**base, max_steps=4), tmp_path / "a", progress=False)
    part = train_heads(cache, lm, TrainConfig(**base, max_steps=2), tmp_path / "b", progress=False)
    assert part.steps == 2 and not part.finished
    rest = train_heads(
        cache, lm, TrainConfig(**base, max_steps=4), tmp_path / "b", resume=True, progress=False
    )
    assert rest.steps == 4
    a, b = _params(full.heads), _params(rest.heads)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in rest.history]


def test_resume_after_an_interrupted_run(tmp_path, monkeypatch):
    cache, _ = cyclic_cache()
    lm = torch.eye(16)
    base = dict(num_heads=2, epochs=1, batch_tokens=16, lr=0.01, seed=5, save_every=2)
    ref = train_heads(cache, lm, TrainConfig(**base), tmp_path / "ref", progress=False)

    calls = {"n": 0}
    real = train_mod.fused_head_loss

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # dies during step 4: the last checkpoint is step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "fused_head_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_heads(cache, lm, TrainConfig(**base), tmp_path / "run", progress=False)
    monkeypatch.setattr(train_mod, "fused_head_loss", real)
    state = torch.load(tmp_path / "run" / train_mod.STATE_FILE, weights_only=False)
    assert state["step"] == 2
    done = train_heads(
        cache, lm, TrainConfig(**base), tmp_path / "run", resume=True, progress=False
    )
    assert done.finished and done.steps == ref.steps
    for k, v in _params(ref.heads).items():
        assert torch.equal(v, done.heads.state_dict()[k]), k


def test_resume_refuses_a_different_run(tmp_path):
    cache, _ = cyclic_cache()
    lm = torch.eye(16)
    train_heads(cache, lm, TrainConfig(num_heads=2, max_steps=1), tmp_path, progress=False)
    with pytest.raises(TrainingError, match="different run"):
        train_heads(cache, lm, TrainConfig(num_heads=3), tmp_path, resume=True, progress=False)
    with pytest.raises(TrainingError, match="no training state"):
        train_heads(cache, lm, TrainConfig(), tmp_path / "none", resume=True, progress=False)


def test_train_rejects_hidden_states_of_another_model():
    cache, _ = cyclic_cache()
    with pytest.raises(TrainingError, match="another model"):
        train_heads(cache, torch.eye(32), TrainConfig(), progress=False)


def test_train_config_validation():
    with pytest.raises(TrainingError, match="head-weights"):
        TrainConfig(num_heads=2, head_weights=[1.0]).validate()
    with pytest.raises(TrainingError, match="shared"):
        TrainConfig(shared_lm_head=False, train_vocab=100).validate()


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [train_mod.lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert train_mod.lr_at(100, 100, 1.0, 0.1) == pytest.approx(0.0)


# -------------------------------------------------------------------- hidden states


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def test_hidden_states_are_the_lm_head_input_at_the_answer_positions():
    model = tiny_llama()
    convs = [
        Conversation(0, [1, 2, 3], [4, 5, 6, 7, 8]),
        Conversation(1, [9, 10], [11, 12]),
        Conversation(2, [13, 14, 15, 16, 17, 18, 19], [20, 21, 22, 23]),
    ]
    cache = compute_hidden(model, convs, batch_tokens=20, progress=False, fp16=False)
    row = 0
    for c in convs:
        seq = c.prompt_ids + c.answer_ids
        with torch.no_grad():
            out = model(torch.tensor([seq]), output_hidden_states=True)
        ref = out.hidden_states[-1][0]
        assert torch.allclose(model.lm_head(ref), out.logits[0], atol=1e-5)
        p = len(c.prompt_ids)
        for t in range(p - 1, len(seq) - 1):  # positions whose next token is an answer token
            assert torch.allclose(cache.hidden[row], ref[t], atol=1e-5)
            assert int(cache.tokens[cache.pos[row]]) == seq[t]
            tgt = cache.targets(2)[row].tolist()
            assert tgt == [seq[t + 2 + i] if t + 2 + i < len(seq) else IGNORE for i in range(2)]
            row += 1
    assert row == cache.num_rows


def test_hidden_cache_round_trip(tmp_path):
    cache, _ = cyclic_cache(n_convs=2, length=8)
    cache.save(tmp_path / "c.safetensors", key="abc")
    assert HiddenCache.load(tmp_path / "c.safetensors", key="other") is None
    back = HiddenCache.load(tmp_path / "c.safetensors", key="abc")
    assert torch.equal(back.hidden, cache.hidden) and torch.equal(back.targets(3), cache.targets(3))


# ------------------------------------------------------------------- tau simulation


def _toy_candidates(seed: int, vocab: int = 3, num_heads: int = 3, lengths=(9, 1, 2, 17, 30)):
    g = torch.Generator().manual_seed(seed)
    answers = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    topk, targets, conv = [], [], []
    for c, ans in enumerate(answers):
        a = len(ans)
        for j in range(a):  # row j: the position that produced answer[j]
            topk.append(torch.stack([torch.randperm(vocab, generator=g) for _ in range(num_heads)]))
            targets.append([ans[j + 1 + i] if j + 1 + i < a else IGNORE for i in range(num_heads)])
            conv.append(c)
    cand = Candidates(torch.stack(topk), torch.tensor(targets), torch.tensor(conv))
    return cand, answers


def _brute_force_tau(cand: Candidates, answers, paths) -> float:
    steps = emitted = 0
    row0 = 0
    for ans in answers:
        a = len(ans)
        j = 0
        while j < a - 1:
            best = 0
            for p in paths:  # every node of the tree, checked on the answer itself
                ok = all(
                    j + d < a and int(cand.topk[row0 + j, d - 1, p[d - 1]]) == ans[j + d]
                    for d in range(1, len(p) + 1)
                )
                if ok:
                    best = max(best, len(p))
            best = min(best, a - 2 - j)
            steps += 1
            emitted += min(best + 1, a - 1 - j)
            j += best + 1
        row0 += a
    return emitted / steps


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "tree", ["chain-3", [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [1, 0, 2]]]
)
def test_simulated_tau_matches_brute_force(seed, tree):
    cand, answers = _toy_candidates(seed)
    t = MedusaTree.resolve(tree)
    sim = simulate_tau(cand, t)
    assert sim["tau"] == pytest.approx(_brute_force_tau(cand, answers, t.paths))
    assert sim["tokens"] == sum(len(a) - 1 for a in answers)  # everything after the prefill


def test_simulated_tau_with_perfect_heads_is_maximal():
    answers = [list(range(20))]
    k = 4
    topk = torch.zeros(20, k, 2, dtype=torch.long)
    targets = torch.full((20, k), IGNORE)
    for j in range(20):
        for i in range(k):
            if j + 1 + i < 20:
                targets[j, i] = j + 1 + i
                topk[j, i, 1] = j + 1 + i  # right token at rank 1
                topk[j, i, 0] = 99
    cand = Candidates(topk, targets, torch.zeros(20, dtype=torch.long))
    assert simulate_tau(cand, MedusaTree.resolve("chain-4"))["tau"] == 1.0  # rank 0 always wrong
    tree = MedusaTree.resolve([[1], [1, 1], [1, 1, 1], [1, 1, 1, 1]])
    sim = simulate_tau(cand, tree)
    assert sim["tau"] == pytest.approx(_brute_force_tau(cand, answers, tree.paths))
    assert sim["tau"] == pytest.approx(19 / 4)  # 5 tokens per step, the last step cut short


# ----------------------------------------------------------------------- calibration


def _all_paths(k, r):
    for d in range(1, k + 1):
        yield from itertools.product(range(r), repeat=d)


def _gain(p, acc):
    g = 1.0
    for d, r in enumerate(p):
        g *= acc[d][r]
    return g


def _brute_force_best(acc, n, k, r):
    """Best prefix-closed tree of n nodes by exhaustive search."""
    best = -1.0
    frontier_start = frozenset()
    seen = set()

    def rec(tree):
        nonlocal best
        if tree in seen:
            return
        seen.add(tree)
        if len(tree) == n:
            best = max(best, sum(_gain(p, acc) for p in tree))
            return
        cands = [(i,) for i in range(r)] + [p + (i,) for p in tree if len(p) < k for i in range(r)]
        for c in cands:
            if c not in tree:
                rec(tree | {c})

    rec(frontier_start)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_grown_tree_is_optimal_and_valid(seed):
    g = torch.Generator().manual_seed(seed)
    k, r = 3, 3
    acc = (torch.rand(k, r, generator=g) * 0.9).tolist()
    for n in range(1, 6):
        paths = grow_tree(acc, n)
        MedusaTree.from_paths(paths, num_heads=k, top_k=r)  # raises when not a valid tree
        assert len(paths) == n
        ours = sum(_gain(tuple(p), acc) for p in paths)
        assert ours == pytest.approx(_brute_force_best(acc, n, k, r))
        # the greedy reference: the n best paths overall
        ranked = sorted(_all_paths(k, r), key=lambda p: (-_gain(p, acc), len(p), p))[:n]
        assert sorted(map(tuple, paths)) == sorted(ranked)


def test_calibration_on_a_known_table():
    acc = [[0.6, 0.2, 0.1], [0.4, 0.1, 0.05], [0.3, 0.1, 0.0], [0.2, 0.05, 0.0]]
    paths = grow_tree(acc, 5)
    # gains: [0]=.6 [0,0]=.24 [1]=.2 [0,0,0]=.072 [2]=.1 (> [1,0]=.08 > [0,1]=.06)
    assert paths == [[0], [0, 0], [1], [2], [1, 0]] or paths == [[0], [0, 0], [1], [2], [0, 0, 0]]
    assert paths == [[0], [0, 0], [1], [2], [1, 0]][:3] + paths[3:]
    assert paths[3] == [2] and paths[4] == [1, 0]
    rep = calibrate(acc, budgets=[1, 2, 4, 8, 16, 32, 64])
    taus = [row["predicted_tau"] for row in rep["budgets"]]
    assert taus == sorted(taus)
    assert taus[0] == pytest.approx(1.6)
    assert rep["budgets"][1]["predicted_tau"] == pytest.approx(1.84)
    assert predicted_tau([[0], [0, 0]], acc) == pytest.approx(1.84)
    with pytest.raises(TrainingError):
        grow_tree([[1.5]], 1)
    with pytest.raises(TrainingError):
        grow_tree(acc, 0)


def test_calibration_with_candidates_reports_simulated_tau():
    cand, answers = _toy_candidates(0)
    acc = rank_accuracy(cand).tolist()
    rep = calibrate(acc, budgets=[2, 4], candidates=cand)
    for row in rep["budgets"]:
        paths = rep["growth_order"][: row["budget"]]
        assert row["simulated_tau"] == pytest.approx(
            _brute_force_tau(cand, answers, [tuple(p) for p in paths]), abs=1e-4
        )


# -------------------------------------------------------------------------- bad input


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "vllm_medusa.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def test_distill_rejects_missing_and_malformed_prompt_files(tmp_path):
    r = _cli("distill", "--prompts", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "nope.jsonl" in r.stdout + r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{not json\n')
    r = _cli("distill", "--prompts", str(bad), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "bad.jsonl:2" in r.stdout + r.stderr
    assert not (tmp_path / "o").exists()


def test_conversation_file_errors_and_tail_repair(tmp_path):
    f = tmp_path / "d.jsonl"
    append_conversations(f, [Conversation(0, [1, 2], [3]), Conversation(1, [4], [5, 6])])
    with f.open("a") as fh:
        fh.write('{"index": 2, "prompt_ids": [1')  # an interrupted write
    with pytest.raises(ConversationFileError, match=":3"):
        read_conversations(f)
    convs = read_conversations(f, repair_tail=True)
    assert [c.index for c in convs] == [0, 1]
    assert read_conversations(f) == convs  # the partial line is gone
    f.write_text('{"index": 0, "prompt_ids": [1, -2], "answer_ids": []}\n')
    with pytest.raises(ConversationFileError, match="prompt_ids"):
        read_conversations(f)
    with pytest.raises(ConversationFileError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")


def test_eval_rejects_heads_of_another_model(tmp_path):
    from vllm_medusa.core.checkpoint import save_heads

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 576, "vocab_size": 49152}))
    heads = MedusaHeads(MedusaConfig(hidden_size=64, vocab_size=49152, num_heads=2))
    save_heads(heads, tmp_path / "heads")
    r = _cli("eval-heads", "--heads", str(tmp_path / "heads"), "--model", str(model))
    assert r.returncode == 2
    assert "do not fit the base model" in r.stderr and "64" in r.stderr


def test_train_rejects_a_malformed_data_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    r = _cli(
        "train",
        "--data",
        str(tmp_path / "d.jsonl"),
        "--output",
        str(tmp_path / "h"),
        "--model",
        str(model),
    )
    assert r.returncode == 2 and "config.json" in r.stderr


def test_calibrate_needs_an_eval_report(tmp_path):
    r = _cli("calibrate-tree", "--heads", str(tmp_path))
    assert r.returncode == 2 and "eval-heads" in r.stderr


def test_training_code_does_not_import_vllm():
    code = (
        "import sys\n"
        "import vllm_medusa.training.train, vllm_medusa.training.evaluate\n"
        "import vllm_medusa.training.calibrate, vllm_medusa.training.distill\n"
        "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), 'vllm'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# -------------------------------------------------------------------------- end to end


def cli(*args) -> str:
    """``vllm-medusa ARGS`` in a subprocess; fails the test with its output on error."""
    r = subprocess.run(
        [sys.executable, "-m", "vllm_medusa.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"},
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    """distill -> train -> eval-heads -> calibrate-tree on SmolLM2, tiny data."""
    data = tmp_path / "distill.jsonl"
    heads = tmp_path / "heads"

    out = cli("distill", "--quick", "--output", str(data))
    convs = read_conversations(data)
    assert len(convs) == 8 and all(0 < len(c.answer_ids) <= 32 for c in convs)
    assert "now holds 8 conversations" in out
    cli("train", "--quick", "--data", str(data), "--output", str(heads), "--num-heads", "3")
    from vllm_medusa.core.checkpoint import load_heads

    h = load_heads(heads, expected_hidden_size=576, expected_vocab_size=49152)
    assert h.num_heads == 3 and h.config.shared_lm_head
    cli("eval-heads", "--quick", "--heads", str(heads))
    report = json.loads((heads / "eval.json").read_text())
    assert len(report["rank_accuracy"]) == 3 and len(report["rank_accuracy"][0]) == 10
    assert report["trees"]["chain-3"]["tau"] >= 1.0
    out = cli(
        "calibrate-tree",
        "--heads",
        str(heads),
        "--budget",
        "8",
        "--plot",
        str(tmp_path / "tau.png"),
    )
    tree = MedusaTree.resolve(heads / "tree.json", num_heads=3)
    assert tree.num_nodes == 8
    assert (tmp_path / "tau.png").stat().st_size > 0
    # the heads folder's tree is now the evaluation default
    cli("eval-heads", "--quick", "--heads", str(heads), "--output", str(tmp_path / "e2.json"))
    assert "tree.json" in json.loads((tmp_path / "e2.json").read_text())["trees"]


@pytest.mark.slow
def test_quick_sequential_pipeline_end_to_end(tmp_path):
    """teacher-force (resumed) -> train-sequential -> eval-heads -> calibrate-tree ->
    learning-curve, on SmolLM2, tiny data."""
    from vllm_medusa.core.checkpoint import load_heads
    from vllm_medusa.core.sequential_heads import SequentialHeads
    from vllm_medusa.training.teacher import load_teacher_data

    data, heads = tmp_path / "tf", tmp_path / "seq-heads"

    # Interrupted after the first shard, then resumed: the second call only appends.
    cli(
        "teacher-force",
        "--output",
        str(data),
        "--tokens",
        "800",
        "--shard-tokens",
        "800",
        "--max-len",
        "256",
    )
    first = json.loads((data / "manifest.json").read_text())
    assert len(first["shards"]) == 1 and first["tokens"] >= 800
    cli("teacher-force", "--quick", "--output", str(data))
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["shards"][0] == first["shards"][0] and len(manifest["shards"]) >= 2
    cache = load_teacher_data(data)
    assert cache.tokens.numel() == cache.next_token.numel()
    assert int((cache.next_token >= 0).sum()) >= manifest["tokens"]  # + the last prompt token
    assert cache.conv.unique().numel() == sum(s["conversations"] for s in manifest["shards"])

    cli(
        "train-sequential",
        "--quick",
        "--data",
        str(data),
        "--output",
        str(heads),
        "--num-heads",
        "3",
    )
    h = load_heads(heads, expected_hidden_size=576, expected_vocab_size=49152)
    assert isinstance(h, SequentialHeads) and h.num_heads == 3
    cli("eval-heads", "--quick", "--heads", str(heads))
    report = json.loads((heads / "eval.json").read_text())
    assert len(report["rank_accuracy"]) == 3 and report["trees"]["chain-3"]["tau"] >= 1.0
    assert set(report["heads_step_ms"]) == {"batch_1", "batch_8"}
    cli("calibrate-tree", "--heads", str(heads), "--budget", "8")
    assert MedusaTree.resolve(heads / "tree.json", num_heads=3).num_nodes == 8
    continuations = heads / "eval.continuations.jsonl"
    out = cli(
        "learning-curve",
        "--data",
        str(data),
        "--sizes",
        "400,800",
        "--eval",
        f"{continuations},{continuations}",
        "--output",
        str(tmp_path / "curve"),
        "--num-heads",
        "2",
        "--draft-vocab",
        "256",
        "--epochs",
        "1",
    )
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [r["tokens"] for r in curve["runs"]] == [400, 800]
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 0, out
