"""NeMo / Megatron-core distributed checkpoints (e.g. Nemotron-4-340B-Base).

An extracted .nemo directory (or a .nemo tar, whose model_weights/ is then extracted to the cache) with
model_config.yaml, tokenizer files and model_weights/: metadata.json names the backend, either zarr (one
directory per tensor: .zarray plus raw C-order chunks "i.j.k") or torch_dist (PyTorch DCP: .metadata plus
*.distcp). Tensors are global; per-layer ones are stacked on a leading layer axis under
model.decoder.layers.<sub>. Fused QKV rows are group-major [groups, heads_per_group + 2, head_dim]; a
gated fc1 is [gate; up].
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Optional, Union

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from fleetgen.model.checkpoint.lazy import (ArrayLeaf, LazySource, ZarrArray, check_views, qkv_group_major,
                                            split_rows)
from fleetgen.model.checkpoint.nemo import CONFIG_FILE, NemoArchive, open_nemo_config
from fleetgen.model.checkpoint.source import CheckpointError
from fleetgen.model.config import ModelConfig

WEIGHTS_DIR = "model_weights"
_FLAT = {"model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
         "model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
         "model.decoder.final_layernorm.weight": "final_layernorm.weight",
         "model.decoder.final_layernorm.bias": "final_layernorm.bias",
         "model.output_layer.weight": "output_layer.weight", "model.output_layer.bias": "output_layer.bias"}
_STACKED = {  # under model.decoder.layers.; TE fuses the norms into the following linear, the local spec not
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "input_layernorm.weight": "input_layernorm.weight", "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias": "self_attention.linear_proj.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
    "pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias": "pre_mlp_layernorm.bias",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight", "mlp.linear_fc2.bias": "mlp.linear_fc2.bias",
    "self_attention.linear_qkv.weight": "qkv", "self_attention.linear_qkv.bias": "qkv",
    "mlp.linear_fc1.weight": "fc1", "mlp.linear_fc1.bias": "fc1",
}
_LAYERS = "model.decoder.layers."


def open_distckpt(path: Union[str, Path, NemoArchive], tokenizer=None, cache_dir: Optional[Path] = None) -> LazySource:
    """A NeMo mcore checkpoint whose model_weights/ is a zarr or torch_dist distributed checkpoint."""
    archive, _, tok, config = open_nemo_config(path, tokenizer, cache_dir)
    where = f"{archive.path}/{CONFIG_FILE}"
    weights = archive.local_dir(WEIGHTS_DIR)
    views = mcore_views(weight_arrays(weights), config, where)
    check_views(views, config, where)
    return LazySource(config, views, tok)


def weight_arrays(weights: Path) -> dict:
    """Key -> array (ZarrArray or DcpArray) for every tensor of model_weights/."""
    meta_path = weights / "metadata.json"
    try:
        backend = json.loads(meta_path.read_text()).get("sharded_backend")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable: {e}") from None
    if backend == "zarr":
        return {d.name: ZarrArray(d) for d in sorted(weights.iterdir()) if (d / ".zarray").is_file()}
    if backend == "torch_dist":
        checkpoint = DcpCheckpoint(weights)
        return {fqn: DcpArray(checkpoint, fqn) for fqn, md in checkpoint.metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata)}
    raise CheckpointError(f"{meta_path}: sharded_backend={backend!r} is not supported (zarr, torch_dist)")


def mcore_views(arrays: dict, config: ModelConfig, where: str) -> dict:
    views = {}
    for key, array in arrays.items():
        if "_extra_state" in key:  # TE's fp8 metadata: meaningless for inference
            continue
        if key in _FLAT:
            views[_FLAT[key]] = ArrayLeaf(array)
        elif key.startswith(_LAYERS) and key[len(_LAYERS):] in _STACKED:
            if array.shape[0] != config.num_layers:
                raise CheckpointError(f"{array.origin}: stacks {array.shape[0]} layers but {where} says "
                                      f"num_layers={config.num_layers}")
            sub, suffix = key[len(_LAYERS):], key.rsplit(".", 1)[1]
            for i in range(config.num_layers):
                views.update({f"layers.{i}.{k}": v
                              for k, v in _layer_views(ArrayLeaf(array, i), _STACKED[sub], suffix, config).items()})
        else:
            raise CheckpointError(f"{array.origin}: unknown key {key}")
    return views


def _layer_views(leaf: ArrayLeaf, canonical: str, suffix: str, config: ModelConfig) -> dict:
    if canonical == "qkv":
        groups = config.num_query_groups
        q, k, v = qkv_group_major(leaf, groups, config.num_attention_heads // groups, config.head_dim)
        return {f"self_attention.query.{suffix}": q, f"self_attention.key.{suffix}": k,
                f"self_attention.value.{suffix}": v}
    if canonical == "fc1":
        if config.activation != "swiglu":
            return {f"mlp.linear_fc1.{suffix}": leaf}
        gate, up = split_rows(leaf, [config.ffn_hidden_size] * 2)  # [gate_all; up_all]
        return {f"mlp.gate.{suffix}": gate, f"mlp.linear_fc1.{suffix}": up}
    return {canonical: leaf}


# ---- torch_dist (PyTorch DCP) -------------------------------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: accept only its own metadata classes, torch sizes and dtypes."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed._shard.sharded_tensor.metadata")
    _NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
              ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if module.startswith(("torch", "pathlib", "collections")) else None
        if (module, name) in self._NAMES or (module in self._MODULES and isinstance(found, type)) or \
                (module == "torch" and isinstance(found, torch.dtype)):
            return found
        raise CheckpointError(f"{self.path}: refusing to unpickle {module}.{name}")


class DcpCheckpoint:
    """A DCP directory read in this process alone: its metadata, and region reads through its own reader."""

    def __init__(self, directory: Path):
        meta_path = directory / ".metadata"
        if not meta_path.is_file():
            raise CheckpointError(f"{meta_path}: file not found (torch_dist checkpoints need it)")
        try:
            self.metadata = _MetadataUnpickler(meta_path.read_bytes(), meta_path).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise CheckpointError(f"{meta_path}: unreadable DCP metadata: {e}") from None
        self.directory = directory
        self.reader = FileSystemReader(str(directory))
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def read_into(self, fqn: str, offsets: list[int], out: torch.Tensor) -> None:
        wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=out.shape)
        items = create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [wanted])
        if sum(torch.Size(item.lengths).numel() for item in items) != out.numel():
            raise CheckpointError(f"{self.directory}: {fqn}: stored chunks do not cover offsets {offsets} "
                                  f"size {list(out.shape)} (missing shard?)")
        try:
            self.reader.read_data(LoadPlan(items), _IntoTensor(out)).wait()
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"{self.directory}: {fqn}: cannot read its shard: {e}") from None


class _IntoTensor(DefaultLoadPlanner):
    """Every read item lands in one preallocated tensor, at the item's destination offsets."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.out


class DcpArray:
    def __init__(self, checkpoint: DcpCheckpoint, fqn: str):
        md = checkpoint.metadata.state_dict_metadata[fqn]
        self.checkpoint, self.fqn = checkpoint, fqn
        self.shape, self.dtype = tuple(md.size), md.properties.dtype
        self.origin = f"{checkpoint.directory}: {fqn}"

    def read(self, region: list[range]) -> torch.Tensor:
        out = torch.empty([len(r) for r in region], dtype=self.dtype)
        if out.numel():
            self.checkpoint.read_into(self.fqn, [r.start for r in region], out)
        return out
