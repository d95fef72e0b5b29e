"""NeMo checkpoints (model/checkpoint/nemo.py): .nemo archives and directories read back at every slice;
bad ones fail at open or read time with a CheckpointError naming the file and the key."""
import shutil
import tarfile

import pytest
import sentencepiece
import torch
import yaml

from fleetgen.model.checkpoint.nemo import nemo_model_config
from fleetgen.model.checkpoint.open import open_checkpoint, read_config
from fleetgen.model.tokenizer import load_tokenizer
from tests.checkpoint_writers import (LEGACY, NEMO_GELU, NEMO_GPT, assert_reads_back, canonical_tensors, make_config,
                                      nemo_config, padded, raises, rewrite, write_nemo)

# the ranks' reader, and the login node's (no torch): each refuses a broken checkpoint alike
READERS = pytest.mark.parametrize("read", [open_checkpoint, read_config], ids=["ranks", "login-node"])


def test_truncated_tar(tmp_path, sp_model):
    config = nemo_config(sp_model)
    path = write_nemo(tmp_path / "m.nemo", config, canonical_tensors(config), sp_model, 2, 1, archive="tar")
    cut = path.stat().st_size * 2 // 3
    with tarfile.open(path) as tar:
        member = next(m.name.removeprefix("./") for m in tar if m.offset_data <= cut < m.offset_data + m.size)
    path.write_bytes(path.read_bytes()[:cut])
    with raises(rf"{path}: truncated or corrupt .nemo archive at or after member {member}: unexpected end"):
        open_checkpoint(path, cache_dir=tmp_path / "cache")


def test_truncated_gzip_tar(tmp_path, sp_model):
    config = nemo_config(sp_model)
    path = write_nemo(tmp_path / "m.nemo", config, canonical_tensors(config), sp_model, archive="gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with raises(rf"{path}: (truncated or corrupt .nemo archive|member .* cannot be extracted)"):
        open_checkpoint(path, cache_dir=tmp_path / "cache")


@READERS
def test_truncated_weights_file(nemo_dir, read):
    shard = nemo_dir / "tp_rank_01_pp_rank_000" / "model_weights.ckpt"
    shard.write_bytes(shard.read_bytes()[:1000])
    with raises(rf"{shard}: not a readable torch checkpoint"):
        read(nemo_dir)


@READERS
def test_missing_nemo_shard(nemo_dir, read):
    shutil.rmtree(nemo_dir / "tp_rank_01_pp_rank_001")
    with raises(rf"{nemo_dir}: missing shard tp_rank_01_pp_rank_001/model_weights.ckpt \(TP=2 x PP=2\)"):
        read(nemo_dir)


@READERS
def test_missing_nemo_shard_named_by_the_config(tmp_path, sp_model, read):
    config = nemo_config(sp_model)
    path = write_nemo(tmp_path / "nemo", config, canonical_tensors(config), sp_model, tp=2)
    shutil.rmtree(path / "mp_rank_01")  # the files alone look like TP=1; model_config.yaml says 2
    with raises(r"missing shard mp_rank_01/model_weights.ckpt \(TP=2 x PP=1\)"):
        read(path)


@READERS
def test_wrong_tensor_shape_in_a_shard(nemo_dir, read):
    shard = nemo_dir / "tp_rank_01_pp_rank_001" / "model_weights.ckpt"
    key = LEGACY + "layers.0.mlp.dense_4h_to_h.weight"
    rewrite(shard, lambda sd: sd.update({key: torch.zeros(33, 24)}))
    with raises(rf"{shard}: {key} \(33, 24\)"):
        read(nemo_dir)


@READERS
def test_wrong_global_shape(nemo_dir, read):
    key = LEGACY + "layers.0.input_layernorm.weight"
    rewrite(nemo_dir / "tp_rank_00_pp_rank_000" / "model_weights.ckpt", lambda sd: sd.update({key: torch.zeros(31)}))
    with raises(rf"tp_rank_00_pp_rank_000/model_weights.ckpt: {key}: gives layers.0.input_layernorm.weight "
                rf"shape \(31,\), but .*model_config.yaml implies \(32,\)"):
        read(nemo_dir)


@READERS
def test_unknown_key(nemo_dir, read):
    shard = nemo_dir / "tp_rank_01_pp_rank_000" / "model_weights.ckpt"
    key = LEGACY + "layers.0.self_attention.adapter.weight"
    rewrite(shard, lambda sd: sd.update({key: torch.zeros(2)}))
    with raises(rf"{shard}: unknown key {key}"):
        read(nemo_dir)


@READERS
def test_missing_key(nemo_dir, read):
    shard = nemo_dir / "tp_rank_00_pp_rank_001" / "model_weights.ckpt"
    key = LEGACY + "final_layernorm.bias"
    rewrite(shard, lambda sd: sd.pop(key))
    with raises(rf"{shard}: missing key {key}"):
        read(nemo_dir)


@pytest.mark.parametrize("change,match", [
    (lambda cfg: cfg.pop("num_layers"), "model_config.yaml: missing key num_layers"),
    (lambda cfg: cfg.update(activation="geglu"), r"model_config.yaml: activation='geglu' is not supported"),
    (lambda cfg: cfg.update(normalization="rmsnorm"), r"model_config.yaml: normalization='rmsnorm'"),
    (lambda cfg: cfg["tokenizer"].update(model="nemo:gone.model"),
     r"model_config.yaml: tokenizer.model='nemo:gone.model' is neither in"),
])
@READERS
def test_bad_model_config(nemo_dir, change, match, read):
    cfg = yaml.safe_load((nemo_dir / "model_config.yaml").read_text())
    change(cfg)
    (nemo_dir / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    with raises(match):
        read(nemo_dir)


def test_reads_outside_the_tensor(nemo_dir):
    source = open_checkpoint(nemo_dir)
    with raises(r"final_layernorm.weight rows: slice 0:64:None is outside 0:32"):
        source.read("final_layernorm.weight", slice(0, 64))
    with raises(r"is 1-D; cols must be None"):
        source.read("final_layernorm.weight", None, slice(0, 4))
    with raises(r"no tensor 'layers.9.mlp.gate.weight'"):
        source.read("layers.9.mlp.gate.weight")


@pytest.mark.parametrize("fields,tp,pp,archive,options", [
    (NEMO_GPT, 1, 1, None, {}),
    (NEMO_GPT, 2, 1, None, {"amp_o2": True}),
    (NEMO_GPT, 1, 2, "tar", {}),
    (NEMO_GPT, 2, 2, "tar", {}),
    (NEMO_GPT, 2, 1, "gz", {"swiglu": "swiglu"}),
    (NEMO_GELU, 2, 2, None, {}),
])
def test_legacy_nemo_reads_back_at_every_slice(tmp_path, sp_model, fields, tp, pp, archive, options):
    config = make_config(fields, sp_model)
    tensors = canonical_tensors(config)
    path = write_nemo(tmp_path / "model.nemo", config, tensors, sp_model, tp, pp, archive=archive, **options)
    source = open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert_reads_back(source, config, padded(config, tensors, tp))
    assert source.tokenizer().encode("lazy zebras") == \
        sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).encode("lazy zebras")


def test_nemo_with_a_gpt2_tokenizer_packed_inside(tmp_path, bpe_dir):
    config = make_config(NEMO_GELU, bpe_dir / "vocab.json")
    tensors = canonical_tensors(config)
    path = write_nemo(tmp_path / "gpt.nemo", config, tensors, bpe_dir, archive="tar")
    source = open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert_reads_back(source, config, padded(config, tensors, 1))
    assert source.tokenizer().encode("quick fox") == load_tokenizer(bpe_dir / "vocab.json").encode("quick fox")


@pytest.mark.parametrize("yaml_fields,expected", [
    ({"activation": "gelu"}, {"activation": "gelu_tanh"}),  # fused bias-gelu is on by default
    ({"activation": "gelu", "bias_activation_fusion": False}, {"activation": "gelu"}),
    ({"activation": "gelu", "bias_activation_fusion": False, "openai_gelu": True}, {"activation": "gelu_tanh"}),
    ({"activation": "gelu", "bias": False}, {"activation": "gelu", "qkv_bias": False, "mlp_bias": False}),
    ({"activation": "fast-swiglu"}, {"activation": "swiglu"}),
    ({"activation": "squared-relu", "num_query_groups": 2}, {"family": "nemotron", "num_query_groups": 2}),
    ({"kv_channels": 16}, {"head_dim": 16}),
    ({"max_position_embeddings": None, "encoder_seq_length": 128}, {"max_position_embeddings": 128}),
    ({"normalization": "LayerNorm", "layernorm_zero_centered_gamma": True}, {"normalization": "layernorm1p"}),
    ({"position_embedding_type": "rope", "rotary_percentage": 0.5, "rotary_base": 500000},
     {"position_embedding": "rope", "rotary_percent": 0.5, "rotary_base": 500000.0}),
    ({"share_embeddings_and_output_weights": False}, {"tie_word_embeddings": False}),
])
def test_model_config_yaml_mapping(sp_model, yaml_fields, expected):
    base = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
            "max_position_embeddings": 64, "encoder_seq_length": 64}
    config = nemo_model_config({**base, **yaml_fields}, load_tokenizer(sp_model), "model_config.yaml")
    assert (config.vocab_size, config.bos_id, config.eos_id, config.pad_id) == (100, 1, 2, 0)
    for field, value in expected.items():
        assert getattr(config, field) == value, field
