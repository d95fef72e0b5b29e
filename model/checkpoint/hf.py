"""Hugging Face model directories (config.json + safetensors or pytorch_model.bin) as a checkpoint source.

Supported model_type: gpt2, gptj, nemotron. Each canonical tensor is a view of one stored tensor: possibly a
row range of a fused one (GPT-2's c_attn holds [q; k; v] on its output axis) and possibly transposed (GPT-2's
Conv1D stores [in, out]). Reads go through safetensors slices or a memory-mapped torch.load, so a rank
touches only the bytes of its slices.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

from safetensors import safe_open

from fleetgen.model.checkpoint.source import CheckpointError, Tokenizer
from fleetgen.model.checkpoint.torchpickle import PickledIndex
from fleetgen.model.config import ModelConfig

if TYPE_CHECKING:  # imported where tensors are read: the login node reads config.json without it
    import torch

HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu", "relu2": "squared_relu"}
# GPT-2's Conv1D layers store [in, out]
CONV1D = frozenset({"self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"})


@dataclass(frozen=True)
class _View:
    key: str                    # stored tensor
    transposed: bool = False    # stored [in, out] (Conv1D); canonical [out, in]
    offset: int = 0             # first canonical row within the stored tensor's output axis
    length: Optional[int] = None  # canonical rows, when only part of the stored output axis


def read_hf_config(path) -> ModelConfig:
    """The architecture from config.json alone; no weight file is opened."""
    file = Path(path) / "config.json"
    raw = _read_config(file)
    model_type = raw.get("model_type")
    if model_type not in _FAMILIES:
        raise CheckpointError(f"{file}: model_type {model_type!r} is not one of {sorted(_FAMILIES)}")
    to_config, _ = _FAMILIES[model_type]
    return to_config(_Fields(raw, file))


class HFSource:
    def __init__(self, path):
        self.path = Path(path)
        self.config: ModelConfig = read_hf_config(self.path)
        _, to_views = _FAMILIES[self.config.family]
        self._files = _WeightFiles(self.path)
        self._views = to_views(self.config, self._files)

    def tokenizer(self) -> Tokenizer:
        from fleetgen.model.tokenizer import load_tokenizer  # the tokenizer formats are another module's job
        return load_tokenizer(self.path, bos_id=self.config.bos_id, eos_id=self.config.eos_id,
                              pad_id=self.config.pad_id)

    def names(self) -> set[str]:
        return {name for name, view in self._views.items() if self._files.has(view.key)}

    def shape(self, name: str) -> tuple[int, ...]:
        view = self._view(name)
        shape = list(self._files.shape(view.key))
        if view.transposed:
            shape.reverse()
        if view.length is not None:
            shape[0] = view.length
        return tuple(shape)

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        view, shape = self._view(name), self.shape(name)
        rows = rows if rows is not None else slice(0, shape[0])
        stored_rows = slice(rows.start + view.offset, rows.stop + view.offset)
        if len(shape) == 1:
            return self._files.read(view.key, (stored_rows,))
        cols = cols if cols is not None else slice(None)
        if view.transposed:
            return self._files.read(view.key, (cols, stored_rows)).T
        return self._files.read(view.key, (stored_rows, cols))

    def _view(self, name: str) -> _View:
        if name not in self._views:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in a {self.config.family} checkpoint")
        return self._views[name]


class _WeightFiles:
    """Stored key -> file, over model.safetensors, a sharded index, or pytorch_model.bin."""

    def __init__(self, path: Path):
        self._torch_files: dict[Path, dict] = {}
        self._indexes: dict[Path, PickledIndex] = {}  # a .bin file's keys and shapes, read without torch
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                self.origin = path / index
                self.where = {k: path / f for k, f in _read_config(self.origin).get("weight_map", {}).items()}
                break
        else:
            single = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
            if not single:
                raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                                      f"pytorch_model.bin")
            self.origin = single[0]
            self.where = {k: single[0] for k in self._keys(single[0])}

    def _keys(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="np") as f:  # the header alone: no torch on the login node
                return list(f.keys())
        return list(self._index(file).shapes)

    def _index(self, file: Path) -> PickledIndex:
        if file not in self._indexes:
            self._indexes[file] = PickledIndex(file)
        return self._indexes[file]

    def _torch(self, file: Path) -> dict:
        if file not in self._torch_files:  # memory-mapped: only pages of slices read are touched
            import torch

            self._torch_files[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return self._torch_files[file]

    def has(self, key: str) -> bool:
        return key in self.where

    def _file(self, key: str) -> Path:
        if key not in self.where:
            raise CheckpointError(f"{self.origin}: no tensor {key!r}")
        if not self.where[key].is_file():
            raise CheckpointError(f"{self.where[key]}: file missing (holds {key!r})")
        return self.where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        file = self._file(key)
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="np") as f:
                return tuple(f.get_slice(key).get_shape())
        return tuple(self._index(file).shapes[key])

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        file = self._file(key)
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                return f.get_slice(key)[index]
        return self._torch(file)[key][index].clone()


class _Fields:
    """config.json values, with errors that name the file and the key."""

    def __init__(self, raw: dict, file: Path):
        self.raw, self.file = raw, file

    def need(self, key: str):
        if self.raw.get(key) is None:
            raise CheckpointError(f"{self.file}: missing {key!r}")
        return self.raw[key]

    def get(self, key: str, default=None):
        value = self.raw.get(key)
        return default if value is None else value

    def activation(self, key: str, default: str) -> str:
        value = self.get(key, default)
        if value not in HF_ACTIVATIONS:
            raise CheckpointError(f"{self.file}: {key}={value!r} is not one of {sorted(HF_ACTIVATIONS)}")
        return HF_ACTIVATIONS[value]

    def token_ids(self) -> dict:
        ids = {}
        for name in ("bos", "eos", "pad"):
            value = self.raw.get(f"{name}_token_id")
            ids[f"{name}_id"] = value[0] if isinstance(value, list) and value else value
        return ids

    def reject(self, key: str, bad) -> None:
        if self.raw.get(key, None) == bad:
            raise CheckpointError(f"{self.file}: {key}={bad!r} is not supported")


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _gpt2_config(c: _Fields) -> ModelConfig:
    hidden, heads = c.need("n_embd"), c.need("n_head")
    c.reject("scale_attn_weights", False)
    c.reject("scale_attn_by_inverse_layer_idx", True)
    return ModelConfig(family="gpt2", num_layers=c.need("n_layer"), hidden_size=hidden,
                       ffn_hidden_size=c.get("n_inner", 4 * hidden), num_attention_heads=heads,
                       num_query_groups=heads, head_dim=hidden // heads, vocab_size=c.need("vocab_size"),
                       max_position_embeddings=c.need("n_positions"), position_embedding="learned",
                       layernorm_eps=c.get("layer_norm_epsilon", 1e-5),
                       activation=c.activation("activation_function", "gelu_new"),
                       tie_word_embeddings=c.get("tie_word_embeddings", True), **c.token_ids())


def _gptj_config(c: _Fields) -> ModelConfig:
    hidden, heads = c.need("n_embd"), c.need("n_head")
    head_dim = hidden // heads
    rotary_dim = c.get("rotary_dim", head_dim)
    if rotary_dim % 2 or rotary_dim > head_dim or int(head_dim * (rotary_dim / head_dim)) != rotary_dim:
        raise CheckpointError(f"{c.file}: rotary_dim={rotary_dim} must be even and at most the head size {head_dim}")
    return ModelConfig(family="gptj", num_layers=c.need("n_layer"), hidden_size=hidden,
                       ffn_hidden_size=c.get("n_inner", 4 * hidden), num_attention_heads=heads,
                       num_query_groups=heads, head_dim=head_dim, vocab_size=c.need("vocab_size"),
                       max_position_embeddings=c.need("n_positions"), position_embedding="rope",
                       rotary_percent=rotary_dim / head_dim, rotary_interleaved=True,
                       layernorm_eps=c.get("layer_norm_epsilon", 1e-5),
                       activation=c.activation("activation_function", "gelu_new"), parallel_residual=True,
                       qkv_bias=False, proj_bias=False, mlp_bias=True, output_bias=True,
                       tie_word_embeddings=False, **c.token_ids())


def _nemotron_config(c: _Fields) -> ModelConfig:
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    rope = c.get("rope_parameters", {})
    if rope.get("rope_type", "default") != "default" or c.get("rope_scaling") is not None:
        raise CheckpointError(f"{c.file}: only default RoPE is supported, got rope_parameters={rope}, "
                              f"rope_scaling={c.get('rope_scaling')}")
    return ModelConfig(family="nemotron", num_layers=c.need("num_hidden_layers"), hidden_size=hidden,
                       ffn_hidden_size=c.need("intermediate_size"), num_attention_heads=heads,
                       num_query_groups=c.get("num_key_value_heads", heads),
                       head_dim=c.get("head_dim", hidden // heads), vocab_size=c.need("vocab_size"),
                       max_position_embeddings=c.need("max_position_embeddings"), position_embedding="rope",
                       rotary_percent=rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5)),
                       rotary_base=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                       normalization="layernorm1p", layernorm_eps=c.get("norm_eps", 1e-5),
                       activation=c.activation("hidden_act", "relu2"), qkv_bias=c.get("attention_bias", False),
                       proj_bias=c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False),
                       tie_word_embeddings=c.get("tie_word_embeddings", False), **c.token_ids())


def _views(config: ModelConfig, layer_modules: dict[str, str], top_modules: dict[str, str],
           transposed: frozenset = frozenset()) -> dict[str, _View]:
    """Canonical module -> stored module ({i} = layer index), each giving .weight and .bias, less the biases
    the config says the model does not have."""
    views = {f"{canonical}.{kind}": _View(f"{stored}.{kind}")
             for canonical, stored in top_modules.items() for kind in ("weight", "bias")}
    for i in range(config.num_layers):
        for canonical, stored in layer_modules.items():
            for kind in ("weight", "bias"):
                views[f"layers.{i}.{canonical}.{kind}"] = _View(f"{stored.format(i=i)}.{kind}",
                                                                kind == "weight" and canonical in transposed)
    has_bias = {"word_embeddings": False, "position_embeddings": False, "output_layer": config.output_bias,
                "query": config.qkv_bias, "key": config.qkv_bias, "value": config.qkv_bias,
                "linear_proj": config.proj_bias, "linear_fc1": config.mlp_bias, "linear_fc2": config.mlp_bias}
    return {name: view for name, view in views.items()
            if not name.endswith(".bias") or has_bias.get(name.split(".")[-2], True)}  # norms keep theirs


def _gpt2_views(config: ModelConfig, files: _WeightFiles) -> dict[str, _View]:
    p = "transformer." if files.has("transformer.wte.weight") else ""  # old hub files have no prefix
    top = {"embedding.word_embeddings": p + "wte", "embedding.position_embeddings": p + "wpe",
           "final_layernorm": p + "ln_f"}
    if not config.tie_word_embeddings:
        top["output_layer"] = "lm_head"
    views = _views(config, {"input_layernorm": p + "h.{i}.ln_1", "self_attention.linear_proj": p + "h.{i}.attn.c_proj",
                            "pre_mlp_layernorm": p + "h.{i}.ln_2", "mlp.linear_fc1": p + "h.{i}.mlp.c_fc",
                            "mlp.linear_fc2": p + "h.{i}.mlp.c_proj"}, top, transposed=CONV1D)
    h = config.hidden_size
    for i in range(config.num_layers):
        for j, part in enumerate(("query", "key", "value")):  # c_attn: [q; k; v] along the output axis
            views[f"layers.{i}.self_attention.{part}.weight"] = _View(f"{p}h.{i}.attn.c_attn.weight", True, j * h, h)
            views[f"layers.{i}.self_attention.{part}.bias"] = _View(f"{p}h.{i}.attn.c_attn.bias", False, j * h, h)
    return views


def _gptj_views(config: ModelConfig, files: _WeightFiles) -> dict[str, _View]:
    block = "transformer.h.{i}."
    return _views(config, {"input_layernorm": block + "ln_1", "self_attention.query": block + "attn.q_proj",
                           "self_attention.key": block + "attn.k_proj", "self_attention.value": block + "attn.v_proj",
                           "self_attention.linear_proj": block + "attn.out_proj", "mlp.linear_fc1": block + "mlp.fc_in",
                           "mlp.linear_fc2": block + "mlp.fc_out"},
                  {"embedding.word_embeddings": "transformer.wte", "final_layernorm": "transformer.ln_f",
                   "output_layer": "lm_head"})


def _nemotron_views(config: ModelConfig, files: _WeightFiles) -> dict[str, _View]:
    block = "model.layers.{i}."
    top = {"embedding.word_embeddings": "model.embed_tokens", "final_layernorm": "model.norm"}
    if not config.tie_word_embeddings:
        top["output_layer"] = "lm_head"
    return _views(config, {"input_layernorm": block + "input_layernorm",
                           "pre_mlp_layernorm": block + "post_attention_layernorm",
                           "self_attention.query": block + "self_attn.q_proj",
                           "self_attention.key": block + "self_attn.k_proj",
                           "self_attention.value": block + "self_attn.v_proj",
                           "self_attention.linear_proj": block + "self_attn.o_proj",
                           "mlp.linear_fc1": block + "mlp.up_proj", "mlp.linear_fc2": block + "mlp.down_proj"}, top)


_FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "gpt2": (_gpt2_config, _gpt2_views),
    "gptj": (_gptj_config, _gptj_views),
    "nemotron": (_nemotron_config, _nemotron_views),
}
