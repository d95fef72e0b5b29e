"""Megatron-LM checkpoints (model/checkpoint/megatron.py): read back at every slice; bad ones name the file and key."""
import shutil

import pytest
import torch

from fleetgen.model.checkpoint.open import open_checkpoint, read_config
from tests.checkpoint_writers import (GPT2, GPT2_HEAD64, MEGATRON_MODERN, Gadget, assert_reads_back, canonical_tensors,
                                      make_config, padded, raises, rewrite, write_megatron)

# the ranks' reader, and the login node's (no torch): each refuses a broken checkpoint alike
READERS = pytest.mark.parametrize("read", [open_checkpoint, read_config], ids=["ranks", "login-node"])


@pytest.mark.parametrize("fields,tp,pp,version,with_args", [
    (GPT2, 1, 1, 0, True),
    (GPT2, 2, 1, 0, True),
    (GPT2, 2, 2, 1.0, True),
    (GPT2, 1, 2, 2.0, True),
    (GPT2, 2, 2, 3.0, True),
    (GPT2_HEAD64, 2, 1, 3.0, False),
    (MEGATRON_MODERN, 2, 2, 3.0, True),
])
def test_megatron_reads_back_at_every_slice(tmp_path, bpe_dir, fields, tp, pp, version, with_args):
    config = make_config(fields, bpe_dir / "vocab.json")
    tensors = canonical_tensors(config)
    path = write_megatron(tmp_path / "megatron", config, tensors, tp, pp, version, with_args, tokenizer_dir=bpe_dir)
    source = open_checkpoint(path)
    assert_reads_back(source, config, padded(config, tensors, tp))
    assert source.shape("embedding.word_embeddings.weight")[0] == {1: 384, 2: 512}[tp]  # 320 tokens, padded


def test_megatron_iteration_directory_and_explicit_tokenizer(tmp_path, bpe_dir):
    config = make_config(GPT2, bpe_dir / "vocab.json")
    tensors = canonical_tensors(config)
    path = write_megatron(tmp_path / "megatron", config, tensors, release=False)
    source = open_checkpoint(path, format="megatron", tokenizer=bpe_dir / "tokenizer.json")
    assert_reads_back(source, config, padded(config, tensors, 1))


@READERS
def test_missing_megatron_shard(megatron_dir, read):
    shutil.rmtree(megatron_dir / "release" / "mp_rank_01")
    with raises(r"release: missing shard mp_rank_01/model_optim_rng.pt \(TP=2 x PP=1\)"):
        read(megatron_dir)


@READERS
def test_wrong_fused_qkv_rows(megatron_dir, read):
    shard = megatron_dir / "release" / "mp_rank_00" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: sd["model"]["language_model"]["encoder"].update(
        {"layers.1.self_attention.query_key_value.weight": torch.zeros(40, 32)}))
    with raises(rf"{shard}: model.language_model.encoder.layers.1.self_attention.query_key_value.weight: "
                r"fused QKV has 40 rows, expected 48"):
        read(megatron_dir)


@READERS
def test_unknown_megatron_key(megatron_dir, read):
    shard = megatron_dir / "release" / "mp_rank_01" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: sd["model"].update({"vision_tower": {"weight": torch.zeros(2)}}))
    with raises(rf"{shard}: unknown key model.vision_tower.weight"):
        read(megatron_dir)


@READERS
def test_missing_key_in_megatron(megatron_dir, read):
    shard = megatron_dir / "release" / "mp_rank_01" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: sd["model"]["language_model"]["encoder"].pop("layers.0.mlp.dense_4h_to_h.weight"))
    with raises(rf"{shard}: missing key .*layers.0.mlp.dense_4h_to_h.weight"):
        read(megatron_dir)


@READERS
def test_unsupported_checkpoint_version(megatron_dir, read):
    for rank in ("mp_rank_00", "mp_rank_01"):
        rewrite(megatron_dir / "release" / rank / "model_optim_rng.pt",
                lambda sd: sd.update({"checkpoint_version": 4.0}))
    with raises(r"mp_rank_00/model_optim_rng.pt: checkpoint_version=4.0 is not supported"):
        read(megatron_dir)


@pytest.mark.parametrize("read", [open_checkpoint, read_config])  # the ranks' reader; the login node's, no torch
def test_pickle_needing_an_arbitrary_object_is_refused(megatron_dir, read):
    shard = megatron_dir / "release" / "mp_rank_00" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: setattr(sd["args"], "hook", Gadget()))
    with raises(rf"{shard}: refusing to unpickle tests.checkpoint_writers.Gadget"):
        read(megatron_dir)


@pytest.mark.parametrize("read", [lambda path: open_checkpoint(path).config, read_config])
def test_megatron_rng_state_with_numpy_arrays_is_allowed(megatron_dir, read):
    import numpy as np

    for rank in ("mp_rank_00", "mp_rank_01"):
        rewrite(megatron_dir / "release" / rank / "model_optim_rng.pt",
                lambda sd: sd.update({"rng_state": [{"np_rng_state": np.random.get_state(),
                                                     "torch_rng_state": torch.get_rng_state()}]}))
    assert read(megatron_dir).num_layers == 2


def test_the_login_nodes_reader_refuses_a_legacy_pickle_needing_an_arbitrary_object(megatron_dir):
    shard = megatron_dir / "release" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(shard, weights_only=False)
    sd["args"].hook = Gadget()
    torch.save(sd, shard, _use_new_zipfile_serialization=False)  # before torch 1.6: no zip, pickles in a row
    with raises(rf"{shard}: refusing to unpickle tests.checkpoint_writers.Gadget"):
        read_config(megatron_dir)
    del sd["args"].hook
    torch.save(sd, shard, _use_new_zipfile_serialization=False)
    assert read_config(megatron_dir) == open_checkpoint(megatron_dir).config


def test_megatron_without_a_tokenizer(megatron_dir):
    for name in ("vocab.json", "merges.txt"):
        (megatron_dir / name).unlink()
    with raises(rf"{megatron_dir}: no tokenizer beside the checkpoint .*pass tokenizer="):
        open_checkpoint(megatron_dir)


def test_tracker_naming_a_missing_directory(megatron_dir):
    (megatron_dir / "latest_checkpointed_iteration.txt").write_text("2000")
    with raises(r"latest_checkpointed_iteration.txt: names iter_0002000, which is missing"):
        open_checkpoint(megatron_dir)
