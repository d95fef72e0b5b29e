"""Megatron-LM (legacy GPT) checkpoints, e.g. the GPT2-345M release.

Layout: latest_checkpointed_iteration.txt ("release" or an iteration number) beside release/ or
iter_NNNNNNN/, holding mp_rank_XX/ (TP only) or mp_rank_XX_YYY/ (TP x PP) with model_optim_rng.pt: a torch
pickle with nested model.language_model.{embedding,transformer|encoder} state, checkpoint_version and,
when present, the training args (an argparse.Namespace). Fused QKV row order depends on
checkpoint_version, per TP partition: 0 -> [3, np, hn]; 1.0 -> [np, hn, 3]; 2.0 and later -> [np, 3, hn]
(grouped: [ng, np/ng + 2, hn]).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Union

from fleetgen.model.checkpoint.lazy import (Concat, LazySource, Rows, Stored, TorchFile, check_views,
                                            qkv_group_major, split_rows)
from fleetgen.model.checkpoint.source import CheckpointError, Tokenizer
from fleetgen.model.config import ModelConfig
from fleetgen.model.tokenizer import given_tokenizer, load_tokenizer

TRACKER = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"
SUPPORTED_VERSIONS = (0, 1.0, 2.0, 3.0)
GPT2_HEAD_DIM = 64  # every GPT-2 size (small ... xl) uses 64-wide heads: how heads are known without args
_SHARD_DIR = re.compile(r"mp_rank_(\d+)(?:_(\d+))?")
_LAYER = re.compile(r"language_model\.(?:transformer|encoder)\.layers\.(\d+)\.")
_KNOWN = re.compile(r"model\.(word_embeddings_for_head\.weight|language_model\.(embedding\.(word|position)_embeddings"
                    r"\.weight|output_layer\.weight|(transformer|encoder)\.(final_layernorm\.(weight|bias)|layers\.\d+"
                    r"\.((input|post_attention)_layernorm|(self_)?attention\.(query_key_value|dense)|mlp\.dense_"
                    r"(h_to_4h|4h_to_h))\.(weight|bias))))$")


def checkpoint_dir(root: Path) -> Path:
    tracker = root / TRACKER
    if not tracker.is_file():
        raise CheckpointError(f"{root}: no {TRACKER}")
    value = tracker.read_text().strip()
    if value == "release":
        directory = root / "release"
    elif value.isdigit():
        directory = root / f"iter_{int(value):07d}"
    else:
        raise CheckpointError(f"{tracker}: expected 'release' or an iteration number, found {value!r}")
    if not directory.is_dir():
        raise CheckpointError(f"{tracker}: names {directory.name}, which is missing")
    return directory


def shard_files(directory: Path, args) -> dict[tuple[int, int], Path]:
    """(tp_rank, pp_rank) -> shard file, checking the whole TP x PP grid is there."""
    found = {}
    for d in directory.iterdir():
        if m := _SHARD_DIR.fullmatch(d.name):
            found[(int(m.group(1)), int(m.group(2) or 0))] = d / SHARD_FILE
    if not found:
        raise CheckpointError(f"{directory}: no mp_rank_* shard directories")
    tp = max(max(t for t, _ in found) + 1, getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = max(max(p for _, p in found) + 1, getattr(args, "pipeline_model_parallel_size", 1) or 1)
    for t in range(tp):
        for p in range(pp):
            name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
            if (t, p) not in found or not found[(t, p)].is_file():
                raise CheckpointError(f"{directory}: missing shard {name}/{SHARD_FILE} (TP={tp} x PP={pp})")
    return found


def _first_shard(directory: Path) -> Path:
    for name in ("mp_rank_00", "mp_rank_00_000"):
        if (directory / name / SHARD_FILE).is_file():
            return directory / name / SHARD_FILE
    raise CheckpointError(f"{directory}: missing shard mp_rank_00/{SHARD_FILE} (or mp_rank_00_000/)")


def find_tokenizer(root: Path, override) -> Tokenizer:
    if override is not None:
        return given_tokenizer(override)
    for d in (root, root.parent):
        if (d / "vocab.json").is_file() or (d / "tokenizer.json").is_file() or any(d.glob("*.model")):
            return load_tokenizer(d)
    raise CheckpointError(f"{root}: no tokenizer beside the checkpoint (vocab.json + merges.txt, tokenizer.json "
                          f"or *.model in it or its parent); pass tokenizer=")


def open_megatron(path: Union[str, Path], tokenizer=None, index=TorchFile) -> LazySource:
    """A Megatron-LM GPT checkpoint directory (the one holding latest_checkpointed_iteration.txt). index: how
    each shard file is opened; torchpickle.PickledIndex, without torch, gives a source that checks the
    checkpoint's keys and shapes against its args but cannot read (the login node's check, open.read_config)."""
    root = Path(path)
    directory = checkpoint_dir(root)
    first = index(_first_shard(directory))
    args = first.values.get("args")
    version = first.values.get("checkpoint_version", 0)
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{first.path}: checkpoint_version={version} is not supported "
                              f"({', '.join(map(str, SUPPORTED_VERSIONS))})")
    files = {ranks: (first if p == first.path else index(p))
             for ranks, p in sorted(shard_files(directory, args).items())}
    tok = find_tokenizer(root, tokenizer)
    config = megatron_config(args, tok, files, where=str(first.path))
    views = MegatronLayout(files, config, version).views()
    check_views(views, config, f"{first.path} (args)" if args else f"{first.path} (tensor shapes)")
    return LazySource(config, views, tok, list(files.values()))


def megatron_config(args, tok: Tokenizer, files: dict, where: str) -> ModelConfig:
    """From the args Namespace when saved; otherwise from tensor shapes and GPT-2's fixed head width."""
    common = {"family": "gpt2", "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
              "pad_id": tok.pad_id}
    if args is None:
        return _config_from_shapes(files, common, where)

    def get(key, default=None):  # older Megatron versions lack newer args, or save them as None
        return default if getattr(args, key, None) is None else getattr(args, key)

    heads, hidden = args.num_attention_heads, args.hidden_size
    bias = get("add_bias_linear", True)
    if get("normalization", "LayerNorm") != "LayerNorm":
        raise CheckpointError(f"{where}: args.normalization={args.normalization!r} is not supported (LayerNorm)")
    rope = get("position_embedding_type", "learned_absolute") == "rope" or get("use_rotary_position_embeddings")
    if get("swiglu"):
        activation = "swiglu"
    elif get("squared_relu"):
        activation = "squared_relu"
    else:  # Megatron's fused bias-gelu (default, with biases) and openai_gelu are the tanh approximation
        activation = "gelu_tanh" if get("openai_gelu") or (get("bias_gelu_fusion", True) and bias) else "gelu"
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=hidden, ffn_hidden_size=get("ffn_hidden_size", 4 * hidden),
        num_attention_heads=heads,
        num_query_groups=get("num_query_groups", heads) if get("group_query_attention") else heads,
        head_dim=get("kv_channels", hidden // heads), max_position_embeddings=args.max_position_embeddings,
        position_embedding="rope" if rope else "learned", rotary_percent=float(get("rotary_percent", 1.0)),
        rotary_base=float(get("rotary_base", 10000)),
        normalization="layernorm1p" if get("apply_layernorm_1p") else "layernorm",
        layernorm_eps=float(get("layernorm_epsilon", 1e-5)), activation=activation, qkv_bias=bias,
        proj_bias=bias, mlp_bias=bias, tie_word_embeddings=not get("untie_embeddings_and_output_weights", False),
        make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128), **common)


def _config_from_shapes(files: dict, common: dict, where: str) -> ModelConfig:
    tp = max(t for t, _ in files) + 1
    first = files[(0, 0)]
    key = next((k for k in first.shapes if k.endswith("embedding.word_embeddings.weight")), None)
    pos = next((k for k in first.shapes if k.endswith("embedding.position_embeddings.weight")), None)
    fc1 = next((k for k in first.shapes if k.endswith("mlp.dense_h_to_4h.weight")), None)
    if key is None or pos is None or fc1 is None:
        raise CheckpointError(f"{where}: no args, and word/position embeddings or dense_h_to_4h are missing")
    hidden = first.shapes[key][1]
    layers = sum(len({m.group(1) for k in files[(0, p)].shapes if (m := _LAYER.search(k))})
                 for p in range(max(p for _, p in files) + 1))
    last = files[(0, max(p for _, p in files))]
    return ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=first.shapes[fc1][0] * tp,
                       num_attention_heads=hidden // GPT2_HEAD_DIM, num_query_groups=hidden // GPT2_HEAD_DIM,
                       head_dim=GPT2_HEAD_DIM, max_position_embeddings=first.shapes[pos][0],
                       tie_word_embeddings=not any(k.endswith("output_layer.weight") for k in last.shapes),
                       **common)


class LanguageModelLayout:
    """Canonical global views over Megatron's `language_model` keys, which Megatron-LM and legacy NeMo
    checkpoints share: word embeddings split over TP ranks, position embeddings on the first stage, the final
    norm and the output layer on the last, layers numbered from 0 again in every pipeline stage. Subclasses
    give `_find(t, p, name)`, a stored key of TP rank t and stage p; `_layer_counts()`, each stage's number of
    layers; and `_layer(p, j)`, the views of stage p's layer j."""

    config: ModelConfig
    tp: int
    pp: int
    final_norm = "final_layernorm"  # where the final norm's key sits, relative to language_model

    def _column(self, p: int, name: str) -> Concat:
        return Concat([self._find(t, p, name) for t in range(self.tp)], 0)

    def views(self) -> dict:
        last = self.pp - 1
        views = {"embedding.word_embeddings.weight": self._column(0, "embedding.word_embeddings.weight"),
                 "final_layernorm.weight": self._find(0, last, f"{self.final_norm}.weight"),
                 "final_layernorm.bias": self._find(0, last, f"{self.final_norm}.bias")}
        if self.config.position_embedding == "learned":
            views["embedding.position_embeddings.weight"] = self._find(0, 0, "embedding.position_embeddings.weight")
        if not self.config.tie_word_embeddings:
            views["output_layer.weight"] = self._column(last, "output_layer.weight")
        offset = 0
        for p, count in enumerate(self._layer_counts()):
            for j in range(count):
                views.update({f"layers.{offset + j}.{k}": v for k, v in self._layer(p, j).items()})
            offset += count
        return views


class MegatronLayout(LanguageModelLayout):
    """Maps Megatron-LM keys of every shard file to canonical global views."""

    def __init__(self, files: dict[tuple[int, int], TorchFile], config: ModelConfig, version: float):
        self.files, self.config, self.version = files, config, version
        self.tp = max(t for t, _ in files) + 1
        self.pp = max(p for _, p in files) + 1
        for f in files.values():
            for key in f.shapes:
                if key.startswith("model.") and not _KNOWN.fullmatch(key):
                    raise CheckpointError(f"{f.path}: unknown key {key}")
        for what, n in (("num_attention_heads", config.num_attention_heads),
                        ("num_query_groups", config.num_query_groups), ("ffn_hidden_size", config.ffn_hidden_size)):
            if n % self.tp:
                raise CheckpointError(f"{files[(0, 0)].path}: {what}={n} does not divide over {self.tp} TP shards")

    def _find(self, t: int, p: int, suffix: str) -> Stored:
        """The shard's key ending in suffix: transformer/encoder and attention/self_attention vary by version."""
        f = self.files[(t, p)]
        for key in (f"model.language_model.{suffix}", *(f"model.language_model.{block}.{suffix}" for block in
                                                        ("transformer", "encoder"))):
            for variant in (key, key.replace(".self_attention.", ".attention.")):
                if variant in f.shapes:
                    return Stored(f, variant)
        raise CheckpointError(f"{f.path}: missing key model.language_model.transformer.{suffix}")

    def _layer_counts(self) -> list[int]:
        return [len({m.group(1) for k in self.files[(0, p)].shapes if (m := _LAYER.search(k))})
                for p in range(self.pp)]

    def _layer(self, p: int, j: int) -> dict:
        c, pre = self.config, f"layers.{j}."
        out = {f"{canon}.{s}": self._find(0, p, f"{pre}{stored}.{s}")
               for canon, stored in (("input_layernorm", "input_layernorm"),
                                     ("pre_mlp_layernorm", "post_attention_layernorm")) for s in ("weight", "bias")}
        for s in ["weight"] + (["bias"] if c.qkv_bias else []):
            parts = [self._split_qkv(self._find(t, p, f"{pre}self_attention.query_key_value.{s}"))
                     for t in range(self.tp)]
            for i, which in enumerate(("query", "key", "value")):
                out[f"self_attention.{which}.{s}"] = Concat([part[i] for part in parts], 0)
        out["self_attention.linear_proj.weight"] = Concat(
            [self._find(t, p, f"{pre}self_attention.dense.weight") for t in range(self.tp)], 1)
        out["mlp.linear_fc2.weight"] = Concat([self._find(t, p, f"{pre}mlp.dense_4h_to_h.weight")
                                               for t in range(self.tp)], 1)
        if c.proj_bias:
            out["self_attention.linear_proj.bias"] = self._find(0, p, f"{pre}self_attention.dense.bias")
        for s in ["weight"] + (["bias"] if c.mlp_bias else []):
            fc1 = [self._find(t, p, f"{pre}mlp.dense_h_to_4h.{s}") for t in range(self.tp)]
            if c.activation == "swiglu":  # per TP rank: [gate_local; up_local]
                halves = [split_rows(part, [c.ffn_hidden_size // self.tp] * 2) for part in fc1]
                out[f"mlp.gate.{s}"] = Concat([h[0] for h in halves], 0)
                fc1 = [h[1] for h in halves]
            out[f"mlp.linear_fc1.{s}"] = Concat(fc1, 0)
        if c.mlp_bias:
            out["mlp.linear_fc2.bias"] = self._find(0, p, f"{pre}mlp.dense_4h_to_h.bias")
        return out

    def _split_qkv(self, part) -> tuple:
        c = self.config
        heads, groups, hn = c.num_attention_heads // self.tp, c.num_query_groups // self.tp, c.head_dim
        if self.version >= 2.0:
            return qkv_group_major(part, groups, heads // groups, hn)
        expected = 3 * heads * hn
        if part.shape[0] != expected:
            raise CheckpointError(f"{part.origin}: fused QKV has {part.shape[0]} rows, expected {expected}")
        if self.version == 0:  # [3, np, hn]
            return tuple(split_rows(part, [heads * hn] * 3))
        return tuple(Rows(part, range(i, expected, 3)) for i in range(3))  # 1.0: [np, hn, 3]
