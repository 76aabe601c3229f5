"""Medusa checkpoint formats: round trips, format detection and clear errors (pure torch)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_medusa.core.checkpoint import (
    CheckpointError,
    detect_format,
    export_vllm,
    load_heads,
    read_tree_file,
    save_heads,
)
from vllm_medusa.core.heads import MedusaConfig, MedusaHeads

HIDDEN, VOCAB, NUM_HEADS, NUM_LAYERS = 16, 50, 3, 2


def random_heads(shared: bool, num_heads: int = NUM_HEADS, seed: int = 0) -> MedusaHeads:
    config = MedusaConfig(
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
        num_heads=num_heads,
        num_layers=NUM_LAYERS,
        shared_lm_head=shared,
        base_model_name_or_path="base/model",
    )
    heads = MedusaHeads(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return heads


@pytest.fixture
def base_w() -> torch.Tensor:
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def hidden_states() -> torch.Tensor:
    return torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(2))


# ---- independent writers for the FasterDecoding formats -----------------------------


def fasterdecoding_state(heads: MedusaHeads, lm_heads: bool = True) -> dict[str, torch.Tensor]:
    """State dict as the reference repository's ``medusa_head`` ModuleList saves it."""
    k, n_layers = heads.config.num_heads, heads.config.num_layers
    state = {}
    for i in range(k):
        for layer in range(n_layers):
            state[f"{i}.{layer}.linear.weight"] = heads.block_weight[i, layer].detach().clone()
            state[f"{i}.{layer}.linear.bias"] = heads.block_bias[i, layer].detach().clone()
        if lm_heads:
            state[f"{i}.{n_layers}.weight"] = heads.lm_head_weight[i].detach().clone()
    return state


def write_fasterdecoding(
    folder: Path, state: dict[str, torch.Tensor], config: dict | None, suffix: str = ".pt"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"medusa_lm_head{suffix}"
    if suffix == ".pt":
        torch.save(state, weights)
    else:
        save_file(state, str(weights))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return weights


def fd_config(num_heads: int = NUM_HEADS, **extra) -> dict:
    return {
        "medusa_num_heads": num_heads,
        "medusa_num_layers": NUM_LAYERS,
        "base_model_name_or_path": "base/model",
        **extra,
    }


def path_re(path: Path) -> str:
    return re.escape(str(path))


# ---- round trips ----------------------------------------------------------------------


def test_own_lm_head_identical_across_formats(tmp_path, hidden_states):
    heads = random_heads(shared=False)
    reference = heads.logits(hidden_states)

    save_heads(heads, tmp_path / "canonical")
    state = fasterdecoding_state(heads)
    write_fasterdecoding(tmp_path / "fd_pt", state, fd_config(), ".pt")
    write_fasterdecoding(tmp_path / "fd_st", state, fd_config(), ".safetensors")
    export_vllm(heads, tmp_path / "vllm")

    expected_formats = {
        "canonical": "vllm-medusa",
        "fd_pt": "fasterdecoding-v0.1",
        "fd_st": "fasterdecoding-v0.1",
        "vllm": "vllm",
    }
    for name, fmt in expected_formats.items():
        assert detect_format(tmp_path / name) == fmt
        loaded = load_heads(tmp_path / name, expected_hidden_size=HIDDEN, expected_vocab_size=VOCAB)
        assert loaded.checkpoint_info.format == fmt
        assert (loaded.config.num_heads, loaded.config.num_layers) == (NUM_HEADS, NUM_LAYERS)
        assert not loaded.config.shared_lm_head
        assert loaded.config.base_model_name_or_path == "base/model"
        assert torch.equal(loaded.logits(hidden_states), reference), name


def test_shared_lm_head_identical_across_formats(tmp_path, base_w, hidden_states):
    heads = random_heads(shared=True)
    reference = heads.logits(hidden_states, base_w)

    save_heads(heads, tmp_path / "canonical")
    state = fasterdecoding_state(heads, lm_heads=False)
    # vocab_size from config.json in one, from the caller in the other.
    write_fasterdecoding(tmp_path / "fd_pt", state, fd_config(vocab_size=VOCAB), ".pt")
    write_fasterdecoding(tmp_path / "fd_st", state, fd_config(), ".safetensors")
    export_vllm(heads, tmp_path / "vllm", base_lm_head_weight=base_w)
    export_vllm(heads, tmp_path / "vllm_single", base_lm_head_weight=base_w, original_lm_head=True)

    expected_formats = {
        "canonical": "vllm-medusa",
        "fd_pt": "fasterdecoding-shared",
        "fd_st": "fasterdecoding-shared",
        "vllm": "vllm",
        "vllm_single": "vllm",
    }
    for name, fmt in expected_formats.items():
        loaded = load_heads(tmp_path / name, expected_vocab_size=VOCAB)
        assert loaded.checkpoint_info.format == fmt
        assert loaded.config.shared_lm_head, name
        assert loaded.config.vocab_size == VOCAB
        assert torch.equal(loaded.logits(hidden_states, base_w), reference), name

    single = load_file(str(tmp_path / "vllm_single" / "model.safetensors"))
    assert [k for k in single if k.startswith("lm_heads.")] == ["lm_heads.0.weight"]


def test_foreign_vllm_folder_with_original_lm_head(tmp_path, base_w, hidden_states):
    """A vLLM folder not written by us: one original LM head becomes per-head copies."""
    heads = random_heads(shared=False)
    heads.init_from_base_lm_head(base_w)
    folder = tmp_path / "foreign"
    folder.mkdir()
    tensors = {"lm_heads.0.weight": base_w.clone()}
    for h in range(NUM_HEADS):
        for layer in range(NUM_LAYERS):
            tensors[f"blocks.{h}.layers.{layer}.weight"] = (
                heads.block_weight[h, layer].detach().clone()
            )
            tensors[f"blocks.{h}.layers.{layer}.bias"] = heads.block_bias[h, layer].detach().clone()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "model_type": "medusa",
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "num_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "medusa_fc_bias": True,
        "original_lm_head": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_heads(folder)
    assert not loaded.config.shared_lm_head
    assert torch.equal(loaded.logits(hidden_states), heads.logits(hidden_states))


def test_vllm_folder_without_fc_bias_keeps_biases_and_warns(tmp_path, hidden_states):
    heads = random_heads(shared=False)
    folder = export_vllm(heads, tmp_path / "vllm")
    config = json.loads((folder / "config.json").read_text())
    config["medusa_fc_bias"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="vLLM itself would drop the ResBlock biases"):
        loaded = load_heads(folder)
    assert torch.equal(loaded.block_bias, heads.block_bias)


def test_fasterdecoding_keys_with_model_prefix(tmp_path, hidden_states):
    heads = random_heads(shared=False)
    state = {f"medusa_head.{k}": v for k, v in fasterdecoding_state(heads).items()}
    write_fasterdecoding(tmp_path / "fd", state, None)
    loaded = load_heads(tmp_path / "fd")
    assert torch.equal(loaded.logits(hidden_states), heads.logits(hidden_states))


def test_dtype_argument(tmp_path):
    save_heads(random_heads(shared=False), tmp_path / "c")
    loaded = load_heads(tmp_path / "c", dtype=torch.bfloat16)
    assert loaded.block_weight.dtype == torch.bfloat16
    assert loaded.lm_head_weight.dtype == torch.bfloat16


def test_head_count_inferred_from_weights(tmp_path, hidden_states):
    heads = random_heads(shared=False)
    write_fasterdecoding(tmp_path / "fd", fasterdecoding_state(heads), fd_config(num_heads=1))
    with pytest.warns(UserWarning, match=r"medusa_num_heads=1 .* holds 3 heads"):
        loaded = load_heads(tmp_path / "fd")
    assert loaded.config.num_heads == 3
    assert torch.equal(loaded.logits(hidden_states), heads.logits(hidden_states))


def test_tree_file(tmp_path):
    tree = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
    save_heads(random_heads(shared=True), tmp_path / "with", tree=tree)
    save_heads(random_heads(shared=True), tmp_path / "without")
    assert read_tree_file(tmp_path / "with") == tree
    assert json.loads((tmp_path / "with" / "tree.json").read_text()) == {"paths": tree}
    assert load_heads(tmp_path / "with").checkpoint_info.tree == tree
    assert read_tree_file(tmp_path / "without") is None
    assert load_heads(tmp_path / "without").checkpoint_info.tree is None
    # A bare list, as the `tree` option takes it, is a tree file too.
    (tmp_path / "with" / "tree.json").write_text(json.dumps(tree))
    assert load_heads(tmp_path / "with").checkpoint_info.tree == tree
    for malformed in ('{"paths": [[0], "x"]}', '{"nodes": [[0]]}', "[[0], [true]]", "7"):
        (tmp_path / "with" / "tree.json").write_text(malformed)
        with pytest.raises(CheckpointError, match="expected a list of rank paths"):
            read_tree_file(tmp_path / "with")
    (tmp_path / "with" / "tree.json").write_text("[[0], [0")
    with pytest.raises(CheckpointError, match="cannot read .*tree.json"):
        read_tree_file(tmp_path / "with")


def test_canonical_config_contents(tmp_path):
    heads = random_heads(shared=True)
    save_heads(heads, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config == heads.config.to_dict() | {"format": "vllm-medusa", "format_version": 1}
    keys = set(load_file(str(tmp_path / "c" / "heads.safetensors")))
    assert "heads.2.blocks.1.weight" in keys and "heads.2.blocks.1.bias" in keys
    assert not any("lm_head" in k for k in keys)


# ---- vLLM export matches vLLM 0.32's loader ------------------------------------------


def vllm_source(relative: str) -> str:
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    return (Path(next(iter(spec.submodule_search_locations))) / relative).read_text()


def test_vllm_export_matches_vllm_loader(tmp_path, base_w):
    source = vllm_source("model_executor/models/medusa.py")
    # The facts export_vllm relies on, as they appear in vLLM's Medusa model.
    assert 'bias=getattr(config, "medusa_fc_bias", False)' in source  # biases need the flag
    assert "self.blocks = nn.ModuleList" in source and "self.layers = nn.ModuleList" in source
    assert 'f"lm_heads.{i}"' in source
    assert 'name = name.replace("medusa_heads.", "")' in source  # the only prefix stripped
    assert 'replace("model.' not in source  # so keys must not carry a "model." prefix
    config_source = vllm_source("transformers_utils/configs/medusa.py")
    assert 'model_type = "medusa"' in config_source

    heads = random_heads(shared=True)
    folder = export_vllm(heads, tmp_path / "vllm", base_lm_head_weight=base_w)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(str(folder / "model.safetensors"))
    expected_keys = {
        f"blocks.{h}.layers.{layer}.{kind}"
        for h in range(NUM_HEADS)
        for layer in range(NUM_LAYERS)
        for kind in ("weight", "bias")
    } | {f"lm_heads.{h}.weight" for h in range(NUM_HEADS)}
    assert set(tensors) == expected_keys
    assert all(torch.equal(tensors[f"lm_heads.{h}.weight"], base_w) for h in range(NUM_HEADS))
    assert tuple(tensors["blocks.0.layers.0.weight"].shape) == (HIDDEN, HIDDEN)

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "medusa"
    assert config["architectures"] == ["MedusaModel"]
    assert config["medusa_fc_bias"] is True
    assert config["original_lm_head"] is False
    assert (config["hidden_size"], config["vocab_size"]) == (HIDDEN, VOCAB)
    assert (config["num_heads"], config["num_hidden_layers"]) == (NUM_HEADS, NUM_LAYERS)
    assert config["truncated_vocab_size"] == VOCAB
    # vLLM's MedusaConfig renames every top-level key with "num" + "heads"/"layers".
    assert [k for k in config if "num" in k] == ["num_heads", "num_hidden_layers"]


def test_export_vllm_refusals(tmp_path, base_w):
    with pytest.raises(ValueError, match="pass base_lm_head_weight"):
        export_vllm(random_heads(shared=True), tmp_path / "a")
    with pytest.raises(ValueError, match=r"shape \(50, 15\)"):
        export_vllm(random_heads(shared=True), tmp_path / "b", base_lm_head_weight=base_w[:, :15])
    save_heads(random_heads(shared=False), tmp_path / "c")
    with pytest.raises(ValueError, match="heads.safetensors"):
        export_vllm(random_heads(shared=False), tmp_path / "c")


@pytest.mark.vllm
def test_vllm_parses_exported_config(tmp_path, base_w):
    pytest.importorskip("vllm")
    from vllm.model_executor.models.medusa import Medusa, ResidualBlock
    from vllm.transformers_utils.configs.medusa import MedusaConfig as VllmMedusaConfig

    heads = random_heads(shared=True)
    folder = export_vllm(heads, tmp_path / "vllm", base_lm_head_weight=base_w)
    config = VllmMedusaConfig.from_pretrained(str(folder))
    assert (config.num_heads, config.num_hidden_layers) == (NUM_HEADS, NUM_LAYERS)
    assert config.medusa_fc_bias is True
    assert config.truncated_vocab_size == config.vocab_size == VOCAB
    # vLLM's own block module: its parameter names must be exactly the exported block keys.
    block = ResidualBlock(config=config, hidden_size=HIDDEN, num_layers=NUM_LAYERS)
    names = {f"blocks.{h}.{n}" for h in range(NUM_HEADS) for n, _ in block.named_parameters()}
    tensors = load_file(str(folder / "model.safetensors"))
    assert names == {k for k in tensors if k.startswith("blocks.")}
    # vLLM's key remapping of FasterDecoding names agrees with ours.
    for key in fasterdecoding_state(random_heads(shared=False)):
        remapped = Medusa._remap_old_checkpoint_key(key)
        assert remapped in tensors or remapped.startswith("lm_heads."), (key, remapped)


# ---- errors ---------------------------------------------------------------------------


def test_hidden_and_vocab_mismatch(tmp_path):
    weights = write_fasterdecoding(
        tmp_path / "fd", fasterdecoding_state(random_heads(shared=False)), fd_config()
    )
    with pytest.raises(
        CheckpointError,
        match=f"heads in {path_re(weights)} have hidden size 16 but the base model has 576",
    ):
        load_heads(tmp_path / "fd", expected_hidden_size=576)
    with pytest.raises(
        CheckpointError,
        match=f"heads in {path_re(weights)} have vocabulary size 50 but the base model has 49152",
    ):
        load_heads(tmp_path / "fd", expected_vocab_size=49152)
    save_heads(random_heads(shared=True), tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"heads\.safetensors have hidden size 16 .* 576"):
        load_heads(tmp_path / "c", expected_hidden_size=576)


def test_shared_variant_needs_vocab(tmp_path):
    state = fasterdecoding_state(random_heads(shared=True), lm_heads=False)
    weights = write_fasterdecoding(tmp_path / "fd", state, fd_config())
    with pytest.raises(CheckpointError, match=f"{path_re(weights)} .*pass expected_vocab_size"):
        load_heads(tmp_path / "fd")
    write_fasterdecoding(tmp_path / "fd2", state, fd_config(vocab_size=VOCAB))
    with pytest.raises(CheckpointError, match="says vocab_size 50 but the base model has 51"):
        load_heads(tmp_path / "fd2", expected_vocab_size=51)


def test_missing_weight_files(tmp_path):
    folder = tmp_path / "fd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fd_config()))
    with pytest.raises(
        CheckpointError,
        match=f"weight file missing, looked for {path_re(folder / 'medusa_lm_head.safetensors')}"
        f" and {path_re(folder / 'medusa_lm_head.pt')}",
    ):
        load_heads(folder)

    save_heads(random_heads(shared=False), tmp_path / "c")
    (tmp_path / "c" / "heads.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"looked for {path_re(tmp_path / 'c')}/heads"):
        load_heads(tmp_path / "c")

    export_vllm(random_heads(shared=False), tmp_path / "v")
    (tmp_path / "v" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"looked for .*/v/model\.safetensors"):
        load_heads(tmp_path / "v")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_weight_file(tmp_path, suffix):
    weights = write_fasterdecoding(
        tmp_path / "fd", fasterdecoding_state(random_heads(shared=False)), fd_config(), suffix
    )
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read weight file {path_re(weights)}"):
        load_heads(tmp_path / "fd")


def test_inconsistent_shapes(tmp_path):
    state = fasterdecoding_state(random_heads(shared=False))
    state["1.0.linear.weight"] = torch.zeros(HIDDEN + 1, HIDDEN + 1)
    weights = write_fasterdecoding(tmp_path / "a", state, fd_config())
    with pytest.raises(
        CheckpointError, match=rf"{path_re(weights)}: '1\.0\.linear\.weight' has shape \(17, 17\)"
    ):
        load_heads(tmp_path / "a")

    state = fasterdecoding_state(random_heads(shared=False))
    state["2.2.weight"] = torch.zeros(VOCAB + 3, HIDDEN)
    weights = write_fasterdecoding(tmp_path / "b", state, fd_config())
    with pytest.raises(CheckpointError, match=r"'2\.<num_layers>\.weight' has shape \(53, 16\)"):
        load_heads(tmp_path / "b")


def test_missing_keys(tmp_path):
    state = fasterdecoding_state(random_heads(shared=False))
    del state["2.0.linear.weight"]
    weights = write_fasterdecoding(tmp_path / "a", state, fd_config())
    with pytest.raises(
        CheckpointError, match=rf"{path_re(weights)}: head 2 has no layer 0 weight .*'2\.0\."
    ):
        load_heads(tmp_path / "a")

    state = fasterdecoding_state(random_heads(shared=False))
    del state["1.1.linear.bias"]
    write_fasterdecoding(tmp_path / "b", state, fd_config())
    with pytest.raises(CheckpointError, match="head 1 has no layer 1 bias"):
        load_heads(tmp_path / "b")

    state = fasterdecoding_state(random_heads(shared=False))
    del state["0.2.weight"]
    write_fasterdecoding(tmp_path / "c", state, fd_config())
    with pytest.raises(CheckpointError, match=r"heads \[1, 2\] have an LM head .* heads \[0\]"):
        load_heads(tmp_path / "c")

    heads = random_heads(shared=False)
    folder = export_vllm(heads, tmp_path / "v")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["lm_heads.1.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"head 1 has no LM head .*'lm_heads\.1\.weight'"):
        load_heads(folder)


def test_lm_head_at_wrong_index(tmp_path):
    state = fasterdecoding_state(random_heads(shared=False))
    state["0.5.weight"] = state.pop("0.2.weight")
    write_fasterdecoding(tmp_path / "a", state, fd_config())
    with pytest.raises(CheckpointError, match=r"'0\.5\.weight' .* index 5, .* 2 layer"):
        load_heads(tmp_path / "a")


def test_missing_biases_load_as_zero_with_warning(tmp_path, hidden_states):
    heads = random_heads(shared=False)
    with torch.no_grad():
        heads.block_bias.zero_()
    state = {k: v for k, v in fasterdecoding_state(heads).items() if not k.endswith(".bias")}
    write_fasterdecoding(tmp_path / "fd", state, fd_config())
    with pytest.warns(UserWarning, match="no ResBlock biases .* loading them as zeros"):
        loaded = load_heads(tmp_path / "fd")
    assert torch.equal(loaded.logits(hidden_states), heads.logits(hidden_states))


def test_unknown_folder_format(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"\0")
    with pytest.raises(
        CheckpointError,
        match=rf"{path_re(tmp_path / 'x')}: unknown Medusa checkpoint format; expected .*"
        r"medusa_lm_head\.pt.*\['weights\.bin'\]",
    ):
        load_heads(tmp_path / "x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_heads(tmp_path / "missing")


def test_unexpected_fasterdecoding_key(tmp_path):
    state = fasterdecoding_state(random_heads(shared=False))
    state["0.0.norm.weight"] = torch.zeros(HIDDEN)
    write_fasterdecoding(tmp_path / "a", state, fd_config())
    with pytest.raises(CheckpointError, match=r"unexpected tensor '0\.0\.norm\.weight'"):
        load_heads(tmp_path / "a")


def test_vllm_truncated_vocab_refused(tmp_path):
    folder = export_vllm(random_heads(shared=False), tmp_path / "v")
    config = json.loads((folder / "config.json").read_text())
    config["truncated_vocab_size"] = 10
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="truncated_vocab_size 10 < vocab_size 50"):
        load_heads(folder)


def test_vllm_fc_bias_without_biases(tmp_path):
    folder = export_vllm(random_heads(shared=False), tmp_path / "v")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["blocks.0.layers.1.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.layers\.1\.bias'"):
        load_heads(folder)


def test_canonical_config_disagrees_with_weights(tmp_path):
    save_heads(random_heads(shared=False), tmp_path / "c")
    config_file = tmp_path / "c" / "config.json"
    config = json.loads(config_file.read_text())
    config["num_heads"] = 5
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has num_heads 3 but .*config.json says 5"):
        load_heads(tmp_path / "c")
    config["num_heads"], config["format_version"] = 3, 2
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_heads(tmp_path / "c")
    config_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=f"cannot read {path_re(config_file)}"):
        load_heads(tmp_path / "c")
