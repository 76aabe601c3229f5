"""MedusaHeads (stacked weights, batched evaluation) against a per-head loop reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vllm_medusa.core.heads import MedusaConfig, MedusaHeads

H, V = 12, 40


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_heads(num_heads, num_layers, shared, seed=0, dtype=torch.float32):
    config = MedusaConfig(
        hidden_size=H,
        vocab_size=V,
        num_heads=num_heads,
        num_layers=num_layers,
        shared_lm_head=shared,
    )
    heads = MedusaHeads(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.4)
    return heads


def reference_logits(heads: MedusaHeads, x: torch.Tensor, base_lm_head=None) -> torch.Tensor:
    """One head at a time, one layer at a time, with plain matrix-vector algebra."""
    out = []
    for k in range(heads.config.num_heads):
        h = x.double()
        for layer in range(heads.config.num_layers):
            w = heads.block_weight[k, layer].detach().double()
            b = heads.block_bias[k, layer].detach().double()
            h = h + F.silu(h @ w.T + b)
        lm = base_lm_head if heads.config.shared_lm_head else heads.lm_head_weight[k].detach()
        out.append(h @ lm.double().T)
    return torch.stack(out)


@pytest.mark.parametrize("num_heads", [1, 3, 5])
@pytest.mark.parametrize("num_layers", [0, 1, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_batched_matches_per_head_loop(num_heads, num_layers, shared):
    heads = make_heads(num_heads, num_layers, shared, seed=num_heads * 10 + num_layers)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, H, generator=gen)
    base = torch.randn(V, H, generator=gen)
    expected = reference_logits(heads, x, base)
    got = heads.logits(x, base if shared else None)
    assert got.shape == (num_heads, 7, V)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # own LM heads ignore a passed base LM head
    if not shared:
        torch.testing.assert_close(heads.logits(x, base), got)
    # forward() is the block part only
    states = heads(x)
    assert states.shape == (num_heads, 7, H)
    torch.testing.assert_close(heads.compute_logits(states, base), got)
    # the first heads alone (a shallow tree prefix) give the same logits as in the full run
    for k in range(1, num_heads + 1):
        first = heads.compute_logits(heads(x, num_heads=k), base if shared else None)
        torch.testing.assert_close(first, got[:k])
    with pytest.raises(ValueError, match="num_heads"):
        heads(x, num_heads=num_heads + 1)


def test_shared_lm_head_requires_base():
    heads = make_heads(2, 1, shared=True)
    assert heads.lm_head_weight is None
    with pytest.raises(ValueError, match="base_lm_head_weight"):
        heads.logits(torch.randn(3, H))
    with pytest.raises(ValueError, match=rf"base LM head must be \[vocab, {H}\]"):
        heads.logits(torch.randn(3, H), torch.randn(H, V))
    # a padded base vocabulary (as vLLM pads its LM head) is fine
    assert heads.logits(torch.randn(3, H), torch.randn(V + 8, H)).shape == (2, 3, V + 8)


def test_zero_initialised_heads_are_identity():
    for shared in (False, True):
        heads = MedusaHeads(MedusaConfig(H, V, num_heads=4, num_layers=3, shared_lm_head=shared))
        for p in heads.parameters():
            assert torch.count_nonzero(p) == 0
        x = torch.randn(5, H)
        out = heads(x)
        assert out.shape == (4, 5, H)
        for k in range(4):
            torch.testing.assert_close(out[k], x)


def test_init_from_base_lm_head_copies():
    heads = MedusaHeads(MedusaConfig(H, V, num_heads=3))
    base = torch.randn(V, H)
    heads.init_from_base_lm_head(base)
    for k in range(3):
        assert torch.equal(heads.lm_head_weight[k].detach(), base)
    # a copy, not a view of the base weight
    base.add_(1.0)
    assert not torch.equal(heads.lm_head_weight[0].detach(), base)
    # fresh heads initialised from the base LM head reproduce the base logits at every head
    x = torch.randn(4, H)
    logits = heads.logits(x)
    for k in range(3):
        torch.testing.assert_close(logits[k], x @ (base - 1.0).T)
    with pytest.raises(ValueError, match=r"\(vocab, hidden\)"):
        heads.init_from_base_lm_head(torch.randn(H, V))
    shared = MedusaHeads(MedusaConfig(H, V, num_heads=3, shared_lm_head=True))
    shared.init_from_base_lm_head(base)  # nothing to initialise
    assert shared.lm_head_weight is None


def test_topk_shape_and_order():
    heads = make_heads(3, 1, shared=False, seed=4)
    x = torch.randn(6, H)
    top = heads.topk(x, 5)
    assert top.shape == (6, 3, 5)
    logits = reference_logits(heads, x)  # [K, N, V]
    for n in range(6):
        for k in range(3):
            row = logits[k, n]
            ids = top[n, k].tolist()
            assert len(set(ids)) == 5
            values = [float(row[i]) for i in ids]
            assert values == sorted(values, reverse=True)  # best first
            # nothing outside the top-5 beats the 5th
            rest = [float(row[i]) for i in range(V) if i not in ids]
            assert max(rest) <= values[-1]
            assert ids[0] == int(row.argmax())
    shared = make_heads(2, 2, shared=True, seed=5)
    base = torch.randn(V, H)
    top_shared = shared.topk(x, 3, base)
    assert top_shared.shape == (6, 2, 3)
    assert top_shared.is_contiguous()
    assert torch.equal(top_shared[:, :, 0], reference_logits(shared, x, base).argmax(-1).T)


def test_wrong_hidden_size_raises():
    heads = make_heads(2, 1, shared=False)
    with pytest.raises(ValueError, match=f"size {H + 1}.*expect {H}"):
        heads(torch.randn(3, H + 1))
    with pytest.raises(ValueError, match=f"expect {H}"):
        heads.topk(torch.randn(3, H - 1), 2)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        heads(torch.randn(2, 3, H))


def test_other_dtype_heads():
    heads = make_heads(2, 2, shared=False, dtype=torch.float64)
    x = torch.randn(3, H)  # float32 input is converted
    got = heads.logits(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_logits(heads, x))


def test_gradients_flow():
    heads = make_heads(2, 1, shared=False)
    heads.logits(torch.randn(3, H)).sum().backward()
    for p in heads.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_heads"])
@pytest.mark.parametrize("bad", [0, -3, 2.0, "8", None, True])
def test_config_rejects_non_positive_sizes(field, bad):
    kwargs = {"hidden_size": 8, "vocab_size": 16, "num_heads": 2}
    kwargs[field] = bad
    with pytest.raises(ValueError, match=field):
        MedusaConfig(**kwargs)


@pytest.mark.parametrize("bad", [-1, 1.0, "1", True])
def test_config_rejects_bad_num_layers(bad):
    with pytest.raises(ValueError, match="num_layers"):
        MedusaConfig(8, 16, 2, num_layers=bad)


def test_config_zero_layers_allowed():
    assert MedusaConfig(8, 16, 2, num_layers=0).num_layers == 0


def test_config_round_trip(tmp_path):
    config = MedusaConfig(
        hidden_size=8,
        vocab_size=16,
        num_heads=3,
        num_layers=2,
        shared_lm_head=True,
        base_model_name_or_path="org/base",
        extra={"lr": 1e-3},
    )
    assert MedusaConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.json"
    config.save(path)
    assert MedusaConfig.from_dict(json.loads(path.read_text())) == config
    # format markers are tolerated
    data = dict(config.to_dict(), format="medusa", format_version=1)
    assert MedusaConfig.from_dict(data) == config
    # defaults
    minimal = MedusaConfig.from_dict({"hidden_size": 8, "vocab_size": 16, "num_heads": 1})
    assert minimal.num_layers == 1 and minimal.shared_lm_head is False and minimal.extra == {}


def test_config_from_dict_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys.*\['medusa_num_heads', 'zzz'\]"):
        MedusaConfig.from_dict(
            {"hidden_size": 8, "vocab_size": 16, "num_heads": 1, "zzz": 1, "medusa_num_heads": 2}
        )


def test_config_from_dict_missing_keys():
    with pytest.raises(ValueError, match="vocab_size"):
        MedusaConfig.from_dict({"hidden_size": 8, "num_heads": 1})


def test_shipped_assets_carry_no_machine_paths():
    """Committed heads name their base model by its hub name, and no asset holds a path of
    the machine that trained it."""
    import json
    import re

    from vllm_medusa.paths import assets_dir

    folder = assets_dir() / "heads" / "smollm2-135m-instruct"
    config = json.loads((folder / "config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    machine_path = re.compile(r'"(/|~/|[A-Za-z]:\\\\)[^"]*"')
    for path in sorted(assets_dir().rglob("*")):
        if path.suffix in (".json", ".md", ".txt"):
            found = machine_path.findall(path.read_text())
            assert not found, f"{path.name} holds machine paths: {found}"
