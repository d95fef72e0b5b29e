"""Distributed (zarr / torch_dist) checkpoints (model/checkpoint/distckpt.py): read back at every slice; bad ones
name the file and the key."""
import json
import pickle
import shutil
import tarfile

import pytest
import torch

from fleetgen.model.checkpoint.open import detect_format, open_checkpoint
from tests.checkpoint_writers import (NEMO_GELU, NEMO_GPT, NEMOTRON, Gadget, assert_reads_back, canonical_tensors,
                                      make_config, nemo_config, padded, raises, write_distckpt)


@pytest.mark.parametrize("fields,tp,backend,dtype", [
    (NEMOTRON, 1, "zarr", torch.bfloat16),
    (NEMOTRON, 2, "zarr", torch.float32),
    (NEMOTRON, 2, "torch_dist", torch.bfloat16),
    (NEMO_GPT, 2, "zarr", torch.bfloat16),
    (NEMO_GELU, 2, "torch_dist", torch.float32),
])
def test_distributed_checkpoint_reads_back_at_every_slice(tmp_path, sp_model, fields, tp, backend, dtype):
    config = make_config(fields, sp_model)
    tensors = canonical_tensors(config, dtype=dtype)
    path = write_distckpt(tmp_path / "nemotron", config, tensors, sp_model, tp, backend)
    assert detect_format(path) == "distckpt"
    assert_reads_back(open_checkpoint(path), config, padded(config, tensors, tp))


def test_distributed_checkpoint_inside_a_nemo_tar(tmp_path, sp_model):
    config = make_config(NEMOTRON, sp_model)
    tensors = canonical_tensors(config, dtype=torch.bfloat16)
    directory = write_distckpt(tmp_path / "dist", config, tensors, sp_model, 2, "torch_dist")
    with tarfile.open(tmp_path / "nemotron.nemo", "w:") as tar:
        tar.add(directory, arcname=".")
    assert detect_format(tmp_path / "nemotron.nemo") == "distckpt"
    source = open_checkpoint(tmp_path / "nemotron.nemo", cache_dir=tmp_path / "cache")
    assert_reads_back(source, config, padded(config, tensors, 2))


def test_missing_zarr_chunk_fails_the_read_that_needs_it(zarr_dir):
    array = zarr_dir / "model_weights" / "model.decoder.layers.self_attention.linear_proj.weight"
    (array / "1.0.1").unlink()
    source = open_checkpoint(zarr_dir)
    source.read("layers.1.self_attention.linear_proj.weight", cols=slice(0, 16))  # chunk 1.0.0 only
    with raises(rf"{array}/1.0.1: zarr chunk missing"):
        source.read("layers.1.self_attention.linear_proj.weight")


def test_wrong_zarr_shape(zarr_dir):
    meta_path = zarr_dir / "model_weights" / "model.decoder.final_layernorm.weight" / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta["shape"], meta["chunks"] = [30], [30]
    meta_path.write_text(json.dumps(meta))
    with raises(r"model.decoder.final_layernorm.weight: gives final_layernorm.weight shape \(30,\)"):
        open_checkpoint(zarr_dir)


def test_unknown_zarr_array(zarr_dir):
    shutil.copytree(zarr_dir / "model_weights" / "model.decoder.final_layernorm.weight",
                    zarr_dir / "model_weights" / "model.decoder.layers.mlp.router.weight")
    with raises(r"model.decoder.layers.mlp.router.weight: unknown key model.decoder.layers.mlp.router.weight"):
        open_checkpoint(zarr_dir)


def test_missing_zarr_array(zarr_dir):
    shutil.rmtree(zarr_dir / "model_weights" / "model.decoder.layers.mlp.linear_fc2.weight")
    with raises(r"model_config.yaml implies layers.0.mlp.linear_fc2.weight \(32, 48\), which the checkpoint lacks"):
        open_checkpoint(zarr_dir)


def test_dcp_metadata_needing_an_arbitrary_object_is_refused(tmp_path, sp_model):
    config = nemo_config(sp_model)
    path = write_distckpt(tmp_path / "dist", config, canonical_tensors(config), sp_model, 2, "torch_dist")
    (path / "model_weights" / ".metadata").write_bytes(pickle.dumps(Gadget()))
    with raises(r"model_weights/.metadata: refusing to unpickle tests.checkpoint_writers.Gadget"):
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
