"""Bad checkpoints fail at open or read time with a CheckpointError naming the file and the key."""
import argparse
import json
import pickle
import shutil
import tarfile

import pytest
import torch
import yaml

from fleetgen.model.checkpoint.open import open_checkpoint, validate_against
from fleetgen.model.checkpoint.source import CheckpointError
from fleetgen.model.config import ModelConfig
from fleetgen.model.tokenizer import load_tokenizer
from tests import tokenizer_fixtures
from tests.checkpoint_writers import canonical_tensors, write_distckpt, write_megatron, write_nemo

LEGACY = "model.language_model.encoder."
sp_model, bpe_dir = tokenizer_fixtures.sp_model, tokenizer_fixtures.bpe_dir


class Gadget:
    """Stands for any class a pickle could smuggle in."""


def nemo_config(sp_model) -> ModelConfig:
    tok = load_tokenizer(sp_model)
    return ModelConfig(family="nemo_gpt", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                       num_query_groups=4, head_dim=8, vocab_size=tok.vocab_size, max_position_embeddings=64,
                       position_embedding="rope", normalization="layernorm1p", activation="swiglu",
                       qkv_bias=False, proj_bias=False, mlp_bias=False, tie_word_embeddings=False,
                       bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)


def gpt2_config(bpe_dir) -> ModelConfig:
    tok = load_tokenizer(bpe_dir / "vocab.json")
    return ModelConfig(family="gpt2", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                       num_query_groups=4, head_dim=8, vocab_size=tok.vocab_size, max_position_embeddings=32,
                       bos_id=tok.bos_id, eos_id=tok.eos_id)


@pytest.fixture
def nemo_dir(tmp_path, sp_model):
    config = nemo_config(sp_model)
    return write_nemo(tmp_path / "nemo", config, canonical_tensors(config), sp_model, tp=2, pp=2)


@pytest.fixture
def megatron_dir(tmp_path, bpe_dir):
    config = gpt2_config(bpe_dir)
    return write_megatron(tmp_path / "megatron", config, canonical_tensors(config), tp=2, tokenizer_dir=bpe_dir)


@pytest.fixture
def zarr_dir(tmp_path, sp_model):
    config = nemo_config(sp_model)
    return write_distckpt(tmp_path / "dist", config, canonical_tensors(config), sp_model, tp=2)


def rewrite(path, change) -> None:
    """Load a torch file, let change() edit the dict, save it back."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)


def raises(match: str):
    return pytest.raises(CheckpointError, match=match)


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


def test_truncated_weights_file(nemo_dir):
    shard = nemo_dir / "tp_rank_01_pp_rank_000" / "model_weights.ckpt"
    shard.write_bytes(shard.read_bytes()[:1000])
    with raises(rf"{shard}: not a readable torch checkpoint"):
        open_checkpoint(nemo_dir)


def test_missing_nemo_shard(nemo_dir):
    shutil.rmtree(nemo_dir / "tp_rank_01_pp_rank_001")
    with raises(rf"{nemo_dir}: missing shard tp_rank_01_pp_rank_001/model_weights.ckpt \(TP=2 x PP=2\)"):
        open_checkpoint(nemo_dir)


def test_missing_nemo_shard_named_by_the_config(tmp_path, sp_model):
    config = nemo_config(sp_model)
    path = write_nemo(tmp_path / "nemo", config, canonical_tensors(config), sp_model, tp=2)
    shutil.rmtree(path / "mp_rank_01")  # the files alone look like TP=1; model_config.yaml says 2
    with raises(r"missing shard mp_rank_01/model_weights.ckpt \(TP=2 x PP=1\)"):
        open_checkpoint(path)


def test_missing_megatron_shard(megatron_dir):
    shutil.rmtree(megatron_dir / "release" / "mp_rank_01")
    with raises(r"release: missing shard mp_rank_01/model_optim_rng.pt \(TP=2 x PP=1\)"):
        open_checkpoint(megatron_dir)


def test_missing_zarr_chunk_fails_the_read_that_needs_it(zarr_dir):
    array = zarr_dir / "model_weights" / "model.decoder.layers.self_attention.linear_proj.weight"
    (array / "1.0.1").unlink()
    source = open_checkpoint(zarr_dir)
    source.read("layers.1.self_attention.linear_proj.weight", cols=slice(0, 16))  # chunk 1.0.0 only
    with raises(rf"{array}/1.0.1: zarr chunk missing"):
        source.read("layers.1.self_attention.linear_proj.weight")


def test_wrong_tensor_shape_in_a_shard(nemo_dir):
    shard = nemo_dir / "tp_rank_01_pp_rank_001" / "model_weights.ckpt"
    key = LEGACY + "layers.0.mlp.dense_4h_to_h.weight"
    rewrite(shard, lambda sd: sd.update({key: torch.zeros(33, 24)}))
    with raises(rf"{shard}: {key} \(33, 24\)"):
        open_checkpoint(nemo_dir)


def test_wrong_global_shape(nemo_dir):
    key = LEGACY + "layers.0.input_layernorm.weight"
    rewrite(nemo_dir / "tp_rank_00_pp_rank_000" / "model_weights.ckpt", lambda sd: sd.update({key: torch.zeros(31)}))
    with raises(rf"tp_rank_00_pp_rank_000/model_weights.ckpt: {key}: gives layers.0.input_layernorm.weight "
                rf"shape \(31,\), but .*model_config.yaml implies \(32,\)"):
        open_checkpoint(nemo_dir)


def test_wrong_fused_qkv_rows(megatron_dir):
    shard = megatron_dir / "release" / "mp_rank_00" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: sd["model"]["language_model"]["encoder"].update(
        {"layers.1.self_attention.query_key_value.weight": torch.zeros(40, 32)}))
    with raises(rf"{shard}: model.language_model.encoder.layers.1.self_attention.query_key_value.weight: "
                r"fused QKV has 40 rows, expected 48"):
        open_checkpoint(megatron_dir)


def test_wrong_zarr_shape(zarr_dir):
    meta_path = zarr_dir / "model_weights" / "model.decoder.final_layernorm.weight" / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta["shape"], meta["chunks"] = [30], [30]
    meta_path.write_text(json.dumps(meta))
    with raises(r"model.decoder.final_layernorm.weight: gives final_layernorm.weight shape \(30,\)"):
        open_checkpoint(zarr_dir)


def test_unknown_key(nemo_dir):
    shard = nemo_dir / "tp_rank_01_pp_rank_000" / "model_weights.ckpt"
    key = LEGACY + "layers.0.self_attention.adapter.weight"
    rewrite(shard, lambda sd: sd.update({key: torch.zeros(2)}))
    with raises(rf"{shard}: unknown key {key}"):
        open_checkpoint(nemo_dir)


def test_unknown_megatron_key(megatron_dir):
    shard = megatron_dir / "release" / "mp_rank_01" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: sd["model"].update({"vision_tower": {"weight": torch.zeros(2)}}))
    with raises(rf"{shard}: unknown key model.vision_tower.weight"):
        open_checkpoint(megatron_dir)


def test_unknown_zarr_array(zarr_dir):
    shutil.copytree(zarr_dir / "model_weights" / "model.decoder.final_layernorm.weight",
                    zarr_dir / "model_weights" / "model.decoder.layers.mlp.router.weight")
    with raises(r"model.decoder.layers.mlp.router.weight: unknown key model.decoder.layers.mlp.router.weight"):
        open_checkpoint(zarr_dir)


def test_missing_key(nemo_dir):
    shard = nemo_dir / "tp_rank_00_pp_rank_001" / "model_weights.ckpt"
    key = LEGACY + "final_layernorm.bias"
    rewrite(shard, lambda sd: sd.pop(key))
    with raises(rf"{shard}: missing key {key}"):
        open_checkpoint(nemo_dir)


def test_missing_key_in_megatron(megatron_dir):
    shard = megatron_dir / "release" / "mp_rank_01" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: sd["model"]["language_model"]["encoder"].pop("layers.0.mlp.dense_4h_to_h.weight"))
    with raises(rf"{shard}: missing key .*layers.0.mlp.dense_4h_to_h.weight"):
        open_checkpoint(megatron_dir)


def test_missing_zarr_array(zarr_dir):
    shutil.rmtree(zarr_dir / "model_weights" / "model.decoder.layers.mlp.linear_fc2.weight")
    with raises(r"model_config.yaml implies layers.0.mlp.linear_fc2.weight \(32, 48\), which the checkpoint lacks"):
        open_checkpoint(zarr_dir)


def test_unsupported_checkpoint_version(megatron_dir):
    for rank in ("mp_rank_00", "mp_rank_01"):
        rewrite(megatron_dir / "release" / rank / "model_optim_rng.pt",
                lambda sd: sd.update({"checkpoint_version": 4.0}))
    with raises(r"mp_rank_00/model_optim_rng.pt: checkpoint_version=4.0 is not supported"):
        open_checkpoint(megatron_dir)


def test_pickle_needing_an_arbitrary_object_is_refused(megatron_dir):
    shard = megatron_dir / "release" / "mp_rank_00" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: setattr(sd["args"], "hook", Gadget()))
    with raises(rf"{shard}: refusing to unpickle tests.test_format_errors.Gadget"):
        open_checkpoint(megatron_dir)


def test_megatron_rng_state_with_numpy_arrays_is_allowed(megatron_dir):
    import numpy as np

    for rank in ("mp_rank_00", "mp_rank_01"):
        rewrite(megatron_dir / "release" / rank / "model_optim_rng.pt",
                lambda sd: sd.update({"rng_state": [{"np_rng_state": np.random.get_state()}]}))
    assert open_checkpoint(megatron_dir).config.num_layers == 2


def test_dcp_metadata_needing_an_arbitrary_object_is_refused(tmp_path, sp_model):
    config = nemo_config(sp_model)
    path = write_distckpt(tmp_path / "dist", config, canonical_tensors(config), sp_model, 2, "torch_dist")
    (path / "model_weights" / ".metadata").write_bytes(pickle.dumps(Gadget()))
    with raises(r"model_weights/.metadata: refusing to unpickle tests.test_format_errors.Gadget"):
        open_checkpoint(path)


def test_zarr_compression_is_refused(zarr_dir):
    meta_path = zarr_dir / "model_weights" / "model.output_layer.weight" / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta["compressor"] = {"id": "blosc"}
    meta_path.write_text(json.dumps(meta))
    with raises(rf"{meta_path}: only uncompressed"):
        open_checkpoint(zarr_dir)


def test_unknown_sharded_backend(zarr_dir):
    (zarr_dir / "model_weights" / "metadata.json").write_text('{"sharded_backend": "tensorstore"}')
    with raises(r"metadata.json: sharded_backend='tensorstore' is not supported"):
        open_checkpoint(zarr_dir)


@pytest.mark.parametrize("change,match", [
    (lambda cfg: cfg.pop("num_layers"), "model_config.yaml: missing key num_layers"),
    (lambda cfg: cfg.update(activation="geglu"), r"model_config.yaml: activation='geglu' is not supported"),
    (lambda cfg: cfg.update(normalization="rmsnorm"), r"model_config.yaml: normalization='rmsnorm'"),
    (lambda cfg: cfg["tokenizer"].update(model="nemo:gone.model"),
     r"model_config.yaml: tokenizer.model='nemo:gone.model' is neither in"),
])
def test_bad_model_config(nemo_dir, change, match):
    cfg = yaml.safe_load((nemo_dir / "model_config.yaml").read_text())
    change(cfg)
    (nemo_dir / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    with raises(match):
        open_checkpoint(nemo_dir)


def test_megatron_without_a_tokenizer(megatron_dir):
    for name in ("vocab.json", "merges.txt"):
        (megatron_dir / name).unlink()
    with raises(rf"{megatron_dir}: no tokenizer beside the checkpoint .*pass tokenizer="):
        open_checkpoint(megatron_dir)


def test_tracker_naming_a_missing_directory(megatron_dir):
    (megatron_dir / "latest_checkpointed_iteration.txt").write_text("2000")
    with raises(r"latest_checkpointed_iteration.txt: names iter_0002000, which is missing"):
        open_checkpoint(megatron_dir)


def test_nothing_recognisable(tmp_path):
    with raises(rf"{tmp_path}: not a checkpoint fleetgen reads; looked for config.json"):
        open_checkpoint(tmp_path)
    with raises(rf"{tmp_path / 'absent'}: no such file or directory"):
        open_checkpoint(tmp_path / "absent")
    with raises(r"format='safetensors' is not one of"):
        open_checkpoint(tmp_path, format="safetensors")


def test_reads_outside_the_tensor(nemo_dir):
    source = open_checkpoint(nemo_dir)
    with raises(r"final_layernorm.weight rows: slice 0:64:None is outside 0:32"):
        source.read("final_layernorm.weight", slice(0, 64))
    with raises(r"is 1-D; cols must be None"):
        source.read("final_layernorm.weight", None, slice(0, 4))
    with raises(r"no tensor 'layers.9.mlp.gate.weight'"):
        source.read("layers.9.mlp.gate.weight")


def test_validate_against(sp_model):
    config = nemo_config(sp_model)
    validate_against(config, {"model.architecture.num_layers": 2, "hidden_size": 32, "rotary_base": 10000,
                              "ffn_hidden_size": None})
    with raises(r"^model.architecture.num_layers=96 but the checkpoint says 2$"):
        validate_against(config, {"model.architecture.num_layers": 96})
    with raises(r"model.architecture.layers: 'layers' is not a model field; valid: family, num_layers"):
        validate_against(config, {"model.architecture.layers": 2})
