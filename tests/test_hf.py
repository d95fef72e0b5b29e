"""HFSource: config.json mapped to ModelConfig exactly, canonical tensors from every weight layout, and errors
that name the file and key."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fleetgen.model.checkpoint.hf import HFSource
from fleetgen.model.checkpoint.source import CheckpointError
from fleetgen.model.config import ModelConfig
from fleetgen.model.load import load_stage
from fleetgen.model.parallel import ParallelState
from tests import hf_reference as ref

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16, vocab_size=ref.VOCAB,
            max_position_embeddings=ref.POSITIONS, bos_id=ref.BOS, eos_id=ref.EOS, pad_id=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (HF model, its save_pretrained directory)."""
    out = {}
    for family in ("gpt2", "gptj", "nemotron"):
        model = ref.build(family)
        out[family] = (model, ref.save(model, tmp_path_factory.mktemp(family)))
    return out


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    path.write_text(json.dumps(config))


def _copy(source_dir, target_dir):
    target_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target_dir / name).write_bytes((source_dir / name).read_bytes())
    return target_dir


def test_gpt2_config(saved):
    assert HFSource(saved["gpt2"][1]).config == ModelConfig(
        family="gpt2", ffn_hidden_size=256, num_query_groups=4, position_embedding="learned",
        activation="gelu_tanh", tie_word_embeddings=True, **TINY)


def test_gptj_config(saved):
    assert HFSource(saved["gptj"][1]).config == ModelConfig(
        family="gptj", ffn_hidden_size=256, num_query_groups=4, position_embedding="rope", rotary_percent=0.5,
        rotary_interleaved=True, activation="gelu_tanh", parallel_residual=True, qkv_bias=False,
        proj_bias=False, mlp_bias=True, output_bias=True, tie_word_embeddings=False, **TINY)


def test_nemotron_config(saved):
    config = HFSource(saved["nemotron"][1]).config
    assert config == ModelConfig(
        family="nemotron", ffn_hidden_size=96, num_query_groups=2, position_embedding="rope", rotary_percent=0.5,
        normalization="layernorm1p", activation="squared_relu", qkv_bias=False, proj_bias=False,
        mlp_bias=False, tie_word_embeddings=False, **TINY)
    assert config.rotary_dim == 8


def test_nemotron_config_in_the_older_flat_layout(saved, tmp_path):
    directory = _copy(saved["nemotron"][1], tmp_path / "old")
    _edit_config(directory, rope_parameters=None, head_dim=None, partial_rotary_factor=0.25, rope_theta=500.0)
    config = HFSource(directory).config
    assert (config.head_dim, config.rotary_dim, config.rotary_base) == (16, 4, 500.0)


def test_gpt2_fused_and_transposed_weights_become_canonical(saved):
    model, directory = saved["gpt2"]
    source, h = HFSource(directory), 64
    block = model.transformer.h[1]
    c_attn, c_fc = block.attn.c_attn.weight.detach(), block.mlp.c_fc.weight.detach()  # Conv1D: [in, out]
    for j, part in enumerate(("query", "key", "value")):
        name = f"layers.1.self_attention.{part}.weight"
        assert source.shape(name) == (h, h)
        assert torch.equal(source.read(name, slice(16, 32), slice(8, 40)), c_attn[8:40, j * h + 16:j * h + 32].T)
        bias = block.attn.c_attn.bias.detach()[j * h:(j + 1) * h]
        assert torch.equal(source.read(f"layers.1.self_attention.{part}.bias", slice(0, h)), bias)
    assert source.shape("layers.1.mlp.linear_fc1.weight") == (256, 64)
    assert torch.equal(source.read("layers.1.mlp.linear_fc1.weight"), c_fc.T)
    assert "output_layer.weight" not in source.names()  # tied
    assert "embedding.position_embeddings.weight" in source.names()


def test_gpt2_files_without_the_transformer_prefix(saved, tmp_path):
    _, directory = saved["gpt2"]
    old = _copy(directory, tmp_path / "old")
    tensors = load_file(directory / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, old / "model.safetensors")
    name = "layers.0.self_attention.linear_proj.weight"
    assert torch.equal(HFSource(old).read(name), HFSource(directory).read(name))


def _logprobs(source) -> torch.Tensor:
    from fleetgen.model.generate import Generator, greedy_plan
    from tests.hf_reference import padded_batch

    tokens, lengths = padded_batch(ref.PROMPTS)
    plan = greedy_plan("prefill", torch.arange(3), tokens, lengths)
    plan.full_logprobs = True
    ps = ParallelState.single()
    return Generator(load_stage(source, ps, "fp32"), ps, 4, 16).step(plan).full_logprobs


def test_sharded_safetensors_and_pytorch_bin_load_the_same_model(saved, tmp_path):
    model, directory = saved["gptj"]
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    binary = tmp_path / "bin"
    model.config.save_pretrained(binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    want = _logprobs(HFSource(directory))
    assert torch.equal(_logprobs(HFSource(sharded)), want)
    assert torch.equal(_logprobs(HFSource(binary)), want)


def test_unknown_model_type_names_config_json_and_the_value(saved, tmp_path):
    directory = _copy(saved["gpt2"][1], tmp_path / "llama")
    _edit_config(directory, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'llama' is not one of"):
        HFSource(directory)


def test_unsupported_activation_names_the_key(saved, tmp_path):
    directory = _copy(saved["gpt2"][1], tmp_path / "relu")
    _edit_config(directory, activation_function="relu")
    with pytest.raises(CheckpointError, match=r"config\.json: activation_function='relu' is not one of"):
        HFSource(directory)


def test_missing_tensor_names_the_file_and_key(saved, tmp_path):
    _, directory = saved["nemotron"]
    broken = _copy(directory, tmp_path / "broken")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: no tensor 'model\.layers\.1\.mlp\.up_proj"):
        load_stage(HFSource(broken), ParallelState.single(), "fp32")


def test_shapes_that_contradict_the_config_are_named(saved, tmp_path):
    directory = _copy(saved["gpt2"][1], tmp_path / "wide")
    _edit_config(directory, n_inner=128)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.linear_fc1\.weight: shape \[256, 64\], the config "
                                              r"implies \[128, 64\]"):
        load_stage(HFSource(directory), ParallelState.single(), "fp32")


def test_directories_without_weights_or_config_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        HFSource(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_head": 2,
                                                      "n_layer": 1, "vocab_size": 10, "n_positions": 8}))
    with pytest.raises(CheckpointError, match="no model.safetensors, model.safetensors.index.json or "
                                              "pytorch_model.bin"):
        HFSource(tmp_path)


def test_tokenizer_comes_from_the_directory_with_the_config_ids(saved, tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    directory = _copy(saved["gpt2"][1], tmp_path / "with_tokenizer")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the lazy dog sleeps in the sun"] * 20, vocab_size=270, min_frequency=1)
    bpe.save_model(str(directory))
    tokenizer = HFSource(directory).tokenizer()
    assert tokenizer.decode(tokenizer.encode("the lazy dog")) == "the lazy dog"
    assert (tokenizer.bos_id, tokenizer.eos_id) == (ref.BOS, ref.EOS)
