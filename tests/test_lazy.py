"""Lazy tensor files (model/checkpoint/lazy.py): tar members extracted once, mappings dropped over budget."""
from pathlib import Path

from fleetgen.model.checkpoint import lazy
from fleetgen.model.checkpoint.open import open_checkpoint
from tests.checkpoint_writers import NEMO_GPT, canonical_tensors, make_config, write_nemo


def test_tar_members_are_extracted_once_into_the_cache(tmp_path, sp_model):
    config = make_config(NEMO_GPT, sp_model)
    path = write_nemo(tmp_path / "m.nemo", config, canonical_tensors(config), sp_model, 2, 2, archive="tar")
    open_checkpoint(path, cache_dir=tmp_path / "cache")
    extracted = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock")
    assert len(extracted) == 6  # config, tokenizer, four shards: nothing else, no partial files
    stamps = [p.stat().st_mtime_ns for p in extracted]
    open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert [p.stat().st_mtime_ns for p in extracted] == stamps


def test_file_mappings_are_dropped_once_reads_touch_the_budget(tmp_path, sp_model, monkeypatch):
    config = make_config(NEMO_GPT, sp_model)
    path = write_nemo(tmp_path / "m", config, canonical_tensors(config), sp_model)
    weights = str(path / "model_weights.ckpt")
    source = open_checkpoint(path)
    source.read("layers.0.mlp.gate.weight")
    assert weights in Path("/proc/self/maps").read_text()  # small reads keep the mapping, and its index
    monkeypatch.setattr(lazy, "MAPPED_BYTES_BUDGET", 0)
    source.read("layers.0.mlp.gate.weight")
    assert weights not in Path("/proc/self/maps").read_text()  # unmapped: its pages leave our RSS
