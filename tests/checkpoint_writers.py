"""Write tiny checkpoints in the real on-disk layouts, from global canonical tensors and a ModelConfig.

These mirror what NeMo, Megatron-LM and Megatron-core write (see /work/shared/notes/formats.md), at any
source split: TP x PP shards with stage-local layer numbers, the fused QKV layouts of each format, swiglu
halves per TP rank, Megatron's vocabulary padding. They are deliberately written from the layouts, not
from the readers, so that a reader bug cannot hide behind a matching writer bug.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import yaml

from fleetgen.model.checkpoint.source import CheckpointError
from fleetgen.model.config import ModelConfig
from fleetgen.model.tokenizer import load_tokenizer

WORDS = ("the quick brown fox jumps over lazy dog while seven wizards quietly hex bold zebras near "
         "amber rivers and many tiny models serve prompts through pipelines of tensors").split()


# ---- tokenizers ---------------------------------------------------------------------------------------

def corpus(path: Path, sentences: int = 400, seed: int = 0) -> Path:
    """A few KB of sentences over WORDS plus made-up words, so BPE has merges to learn."""
    rng = np.random.default_rng(seed)
    made_up = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(300)]
    lines = [" ".join(rng.choice(WORDS + made_up, size=rng.integers(4, 12))).capitalize() + "."
             for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_sentencepiece(directory: Path, vocab_size: int = 100) -> Path:
    """A tiny SentencePiece BPE model with pad/bos/eos/unk = 0/1/2/3 (GPT-2B-001's order)."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    text = corpus(directory / "corpus.txt")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    return directory / "tokenizer.model"


def train_gpt2_bpe(directory: Path, vocab_size: int = 320) -> Path:
    """A tiny byte-level BPE with GPT-2's <|endoftext|>: vocab.json, merges.txt and tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train([str(corpus(directory / "corpus.txt"))], vocab_size=vocab_size, min_frequency=1,
              special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(directory))
    tok.save(str(directory / "tokenizer.json"))
    return directory


# ---- canonical tensors ----------------------------------------------------------------------------------

def canonical_tensors(config: ModelConfig, seed: int = 0, dtype=torch.float32,
                      device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """Random global tensors under the canonical names; the embedding has exactly vocab_size rows. device: where
    they are drawn and kept (a GPU draws billions in a blink; the CPU's generator takes seconds a billion)."""
    g = torch.Generator(device or "cpu").manual_seed(seed)
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_query_groups * config.head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    out = {"embedding.word_embeddings.weight": rand(v, h), "final_layernorm.weight": rand(h),
           "final_layernorm.bias": rand(h)}
    if config.position_embedding == "learned":
        out["embedding.position_embeddings.weight"] = rand(config.max_position_embeddings, h)
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = rand(v, h)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        out.update({p + "input_layernorm.weight": rand(h), p + "input_layernorm.bias": rand(h),
                    p + "pre_mlp_layernorm.weight": rand(h), p + "pre_mlp_layernorm.bias": rand(h),
                    p + "self_attention.query.weight": rand(q, h), p + "self_attention.key.weight": rand(kv, h),
                    p + "self_attention.value.weight": rand(kv, h),
                    p + "self_attention.linear_proj.weight": rand(h, q),
                    p + "mlp.linear_fc1.weight": rand(f, h), p + "mlp.linear_fc2.weight": rand(h, f)})
        if config.activation == "swiglu":
            out[p + "mlp.gate.weight"] = rand(f, h)
        if config.qkv_bias:
            out.update({p + "self_attention.query.bias": rand(q), p + "self_attention.key.bias": rand(kv),
                        p + "self_attention.value.bias": rand(kv)})
        if config.proj_bias:
            out[p + "self_attention.linear_proj.bias"] = rand(h)
        if config.mlp_bias:
            out.update({p + "mlp.linear_fc1.bias": rand(f), p + "mlp.linear_fc2.bias": rand(h)})
            if config.activation == "swiglu":
                out[p + "mlp.gate.bias"] = rand(f)
    return out


def padded(config: ModelConfig, tensors: dict, tp: int) -> dict:
    """The tensors with vocabulary rows zero-padded to Megatron's multiple of divisible_by * TP."""
    rows = config.padded_vocab_size(tp)
    out = dict(tensors)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in out:
            t = out[name]
            out[name] = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return out


# ---- fused layouts ---------------------------------------------------------------------------------------

def _chunk(t: torch.Tensor, tp: int, rank: int, dim: int = 0) -> torch.Tensor:
    return t.chunk(tp, dim)[rank].contiguous()


def qkv_group_major(q, k, v, groups: int) -> torch.Tensor:
    """[groups, heads_per_group + 2, head_dim] rows: each group's q heads, then its k, then its v."""
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)],
                     dim=1).reshape(-1, *rest)


def qkv_megatron(q, k, v, version: float) -> torch.Tensor:
    """One TP partition's fused QKV in Megatron-LM's checkpoint_version order (no grouped attention)."""
    if version == 0:  # [3, np, hn]
        return torch.cat([q, k, v])
    if version == 1.0:  # [np, hn, 3]
        return torch.stack([q, k, v], dim=1).reshape(-1, *q.shape[1:])
    raise ValueError(version)


def _layer_split(num_layers: int, pp: int) -> list[range]:
    per = num_layers // pp
    return [range(s * per, (s + 1) * per) for s in range(pp)]


# ---- legacy NeMo (.nemo) ------------------------------------------------------------------------------------

def nemo_yaml(config: ModelConfig, tp: int, pp: int, tokenizer: dict, swiglu: str = "fast-swiglu") -> dict:
    activation = {"swiglu": swiglu, "squared_relu": "squared-relu"}.get(config.activation, "gelu")
    cfg = {"mcore_gpt": False, "num_layers": config.num_layers, "hidden_size": config.hidden_size,
           "ffn_hidden_size": config.ffn_hidden_size, "num_attention_heads": config.num_attention_heads,
           "kv_channels": config.head_dim if config.head_dim * config.num_attention_heads != config.hidden_size
           else None,
           "encoder_seq_length": config.max_position_embeddings,
           "max_position_embeddings": config.max_position_embeddings,
           "position_embedding_type": "rope" if config.position_embedding == "rope" else "learned_absolute",
           "rotary_percentage": config.rotary_percent, "rotary_base": config.rotary_base,
           "normalization": config.normalization,
           "layernorm_epsilon": config.layernorm_eps, "activation": activation, "bias": config.qkv_bias,
           "bias_activation_fusion": config.activation == "gelu_tanh",
           "share_embeddings_and_output_weights": config.tie_word_embeddings,
           "make_vocab_size_divisible_by": config.make_vocab_size_divisible_by,
           "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
           "precision": "bf16", "apply_query_key_layer_scaling": True, "tokenizer": tokenizer}
    if config.num_query_groups != config.num_attention_heads:
        cfg["num_query_groups"] = config.num_query_groups
    return cfg


def tokenizer_members(tokenizer_path: Path) -> tuple[dict, dict]:
    """(model_config.yaml tokenizer section, {member name: source file}) as NeMo packs them."""
    if tokenizer_path.suffix == ".model":
        name = f"5f1a2b_{tokenizer_path.name}"
        return {"library": "sentencepiece", "type": None, "model": f"nemo:{name}", "vocab_file": None,
                "merge_file": None}, {name: tokenizer_path}
    vocab, merges = tokenizer_path / "vocab.json", tokenizer_path / "merges.txt"
    return ({"library": "megatron", "type": "GPT2BPETokenizer", "model": None,
             "vocab_file": "nemo:9c1d_vocab.json", "merge_file": "nemo:9c1d_merges.txt"},
            {"9c1d_vocab.json": vocab, "9c1d_merges.txt": merges})


def legacy_state_dicts(config: ModelConfig, tensors: dict, tp: int, pp: int, swiglu: str = "fast-swiglu",
                       amp_o2: bool = False) -> dict[tuple[int, int], dict]:
    """(tp_rank, pp_rank) -> flat legacy NeMo state dict, layer numbers local to the stage."""
    t = padded(config, tensors, tp)
    pre = "model.module.language_model." if amp_o2 else "model.language_model."
    stages = _layer_split(config.num_layers, pp)
    out = {}
    for r in range(tp):
        for s, layers in enumerate(stages):
            sd = {}
            if s == 0:
                sd[pre + "embedding.word_embeddings.weight"] = _chunk(t["embedding.word_embeddings.weight"], tp, r)
                if config.position_embedding == "learned":
                    sd[pre + "embedding.position_embeddings.weight"] = t["embedding.position_embeddings.weight"]
            if config.position_embedding == "rope":
                sd[pre + "rotary_pos_emb.inv_freq"] = torch.ones(config.rotary_dim // 2)
            for j, i in enumerate(layers):
                sd.update(_legacy_layer(config, t, i, f"{pre}encoder.layers.{j}.", tp, r, swiglu))
            if s == pp - 1:
                sd[pre + "encoder.final_layernorm.weight"] = t["final_layernorm.weight"]
                sd[pre + "encoder.final_layernorm.bias"] = t["final_layernorm.bias"]
                if not config.tie_word_embeddings:
                    sd[pre + "output_layer.weight"] = _chunk(t["output_layer.weight"], tp, r)
                elif pp > 1:  # the last stage's copy of the tied embedding
                    sd["model.word_embeddings.weight"] = _chunk(t["embedding.word_embeddings.weight"], tp, r)
            out[(r, s)] = sd
    return out


def _unfused_layer(config, t, i, pre, attn, tp, r) -> dict:
    """The norms and the row-parallel linears of layer i, which legacy NeMo and Megatron-LM key alike
    (attn: the attention module's key prefix)."""
    src = f"layers.{i}."
    sd = {pre + "input_layernorm.weight": t[src + "input_layernorm.weight"],
          pre + "input_layernorm.bias": t[src + "input_layernorm.bias"],
          pre + "post_attention_layernorm.weight": t[src + "pre_mlp_layernorm.weight"],
          pre + "post_attention_layernorm.bias": t[src + "pre_mlp_layernorm.bias"],
          attn + "dense.weight": _chunk(t[src + "self_attention.linear_proj.weight"], tp, r, 1),
          pre + "mlp.dense_4h_to_h.weight": _chunk(t[src + "mlp.linear_fc2.weight"], tp, r, 1)}
    if config.proj_bias:
        sd[attn + "dense.bias"] = t[src + "self_attention.linear_proj.bias"]
    if config.mlp_bias:
        sd[pre + "mlp.dense_4h_to_h.bias"] = t[src + "mlp.linear_fc2.bias"]
    return sd


def _legacy_layer(config, t, i, pre, tp, r, swiglu) -> dict:
    c, src = config, f"layers.{i}."
    sd = _unfused_layer(config, t, i, pre, pre + "self_attention.", tp, r)
    for s in ["weight"] + (["bias"] if c.qkv_bias else []):
        q, k, v = (_chunk(t[f"{src}self_attention.{n}.{s}"], tp, r) for n in ("query", "key", "value"))
        sd[f"{pre}self_attention.query_key_value.{s}"] = qkv_group_major(q, k, v, c.num_attention_heads // tp)
    for s in ["weight"] + (["bias"] if c.mlp_bias else []):
        up = _chunk(t[f"{src}mlp.linear_fc1.{s}"], tp, r)
        if c.activation != "swiglu":
            sd[f"{pre}mlp.dense_h_to_4h.{s}"] = up
            continue
        gate = _chunk(t[f"{src}mlp.gate.{s}"], tp, r)
        if swiglu == "fast-swiglu":
            sd[f"{pre}mlp.dense_h_to_4h.{s}"] = torch.cat([gate, up])
        else:
            sd[f"{pre}mlp.dense_h_to_4h.{s}"], sd[f"{pre}mlp.dense_h_to_4h_2.{s}"] = gate, up
    return sd


def write_nemo(path: Path, config: ModelConfig, tensors: dict, tokenizer_path: Path, tp: int = 1, pp: int = 1,
               archive: Optional[str] = None, swiglu: str = "fast-swiglu", amp_o2: bool = False) -> Path:
    """A legacy .nemo: a directory, or with archive="tar"/"gz" a tar of it written with arcname "."."""
    directory = path.with_suffix(".dir") if archive else path
    directory.mkdir(parents=True)
    tok_cfg, members = tokenizer_members(tokenizer_path)
    for name, src in members.items():
        shutil.copy(src, directory / name)
    (directory / "model_config.yaml").write_text(yaml.safe_dump(nemo_yaml(config, tp, pp, tok_cfg, swiglu)))
    for (r, s), sd in legacy_state_dicts(config, tensors, tp, pp, swiglu, amp_o2).items():
        if tp == 1 and pp == 1:
            shard = directory
        else:
            shard = directory / (f"mp_rank_{r:02d}" if pp == 1 else f"tp_rank_{r:02d}_pp_rank_{s:03d}")
        shard.mkdir(exist_ok=True)
        torch.save(sd, shard / "model_weights.ckpt")
    if not archive:
        return directory
    with tarfile.open(path, "w:gz" if archive == "gz" else "w:") as tar:
        tar.add(directory, arcname=".")
    shutil.rmtree(directory)
    return path


# ---- Megatron-LM -----------------------------------------------------------------------------------------------

def megatron_args(config: ModelConfig, tp: int, pp: int) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, kv_channels=config.head_dim,
        group_query_attention=config.num_query_groups != config.num_attention_heads,
        num_query_groups=config.num_query_groups, max_position_embeddings=config.max_position_embeddings,
        position_embedding_type="rope" if config.position_embedding == "rope" else "learned_absolute",
        rotary_percent=config.rotary_percent, normalization="LayerNorm",
        apply_layernorm_1p=config.normalization == "layernorm1p", layernorm_epsilon=config.layernorm_eps,
        swiglu=config.activation == "swiglu", openai_gelu=False, bias_gelu_fusion=config.activation == "gelu_tanh",
        add_bias_linear=config.qkv_bias, untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        padded_vocab_size=config.padded_vocab_size(tp), params_dtype=torch.float16, iteration=0)


def megatron_state_dicts(config: ModelConfig, tensors: dict, tp: int, pp: int, version: float = 3.0,
                         with_args: bool = True) -> dict[tuple[int, int], dict]:
    t = padded(config, tensors, tp)
    out = {}
    for r in range(tp):
        for s, layers in enumerate(_layer_split(config.num_layers, pp)):
            lm, block = {}, {}
            if s == 0:
                lm["embedding"] = {"word_embeddings": {"weight": _chunk(t["embedding.word_embeddings.weight"], tp, r)}}
                if config.position_embedding == "learned":
                    lm["embedding"]["position_embeddings"] = {"weight": t["embedding.position_embeddings.weight"]}
            for j, i in enumerate(layers):
                block.update(_megatron_layer(config, t, i, f"layers.{j}.", tp, r, version))
            if s == pp - 1:
                block["final_layernorm.weight"] = t["final_layernorm.weight"]
                block["final_layernorm.bias"] = t["final_layernorm.bias"]
                if not config.tie_word_embeddings:
                    lm["output_layer"] = {"weight": _chunk(t["output_layer.weight"], tp, r)}
            lm["transformer" if version < 3.0 else "encoder"] = block
            sd = {"model": {"language_model": lm}, "iteration": 0}
            if version != 0:
                sd["checkpoint_version"] = version
            if with_args:
                sd["args"] = megatron_args(config, tp, pp)
            out[(r, s)] = sd
    return out


def _megatron_layer(config, t, i, pre, tp, r, version) -> dict:
    c, src = config, f"layers.{i}."
    attn = pre + ("attention." if version < 2.0 else "self_attention.")
    sd = _unfused_layer(config, t, i, pre, attn, tp, r)
    for s in ["weight"] + (["bias"] if c.qkv_bias else []):
        q, k, v = (_chunk(t[f"{src}self_attention.{n}.{s}"], tp, r) for n in ("query", "key", "value"))
        sd[f"{attn}query_key_value.{s}"] = (qkv_group_major(q, k, v, c.num_query_groups // tp) if version >= 2.0
                                            else qkv_megatron(q, k, v, version))
    for s in ["weight"] + (["bias"] if c.mlp_bias else []):
        up = _chunk(t[f"{src}mlp.linear_fc1.{s}"], tp, r)
        if c.activation == "swiglu":
            up = torch.cat([_chunk(t[f"{src}mlp.gate.{s}"], tp, r), up])
        sd[f"{pre}mlp.dense_h_to_4h.{s}"] = up
    return sd


def write_megatron(path: Path, config: ModelConfig, tensors: dict, tp: int = 1, pp: int = 1, version: float = 3.0,
                   with_args: bool = True, tokenizer_dir: Optional[Path] = None, release: bool = True) -> Path:
    """A Megatron-LM checkpoint directory; the tokenizer's vocab.json/merges.txt are copied beside it."""
    it_dir = path / ("release" if release else "iter_0000100")
    (path / "latest_checkpointed_iteration.txt").parent.mkdir(parents=True)
    (path / "latest_checkpointed_iteration.txt").write_text("release" if release else "100")
    for (r, s), sd in megatron_state_dicts(config, tensors, tp, pp, version, with_args).items():
        shard = it_dir / (f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{s:03d}")
        shard.mkdir(parents=True)
        torch.save(sd, shard / "model_optim_rng.pt")
    if tokenizer_dir is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_dir / name, path / name)
    return path


# ---- Megatron-core distributed checkpoint -------------------------------------------------------------------

def mcore_global_arrays(config: ModelConfig, tensors: dict, tp: int) -> dict[str, tuple[torch.Tensor, tuple]]:
    """mcore key -> (global tensor, chunk shape): per-layer tensors stacked, chunks = one TP shard of a layer."""
    t = padded(config, tensors, tp)
    out = {}
    for key, name, split in (("model.embedding.word_embeddings.weight", "embedding.word_embeddings.weight", "rows"),
                             ("model.embedding.position_embeddings.weight", "embedding.position_embeddings.weight",
                              "none"),
                             ("model.output_layer.weight", "output_layer.weight", "rows"),
                             ("model.decoder.final_layernorm.weight", "final_layernorm.weight", "none"),
                             ("model.decoder.final_layernorm.bias", "final_layernorm.bias", "none")):
        if name in t:
            a = t[name]
            out[key] = (a, (a.shape[0] // tp, *a.shape[1:]) if split == "rows" else tuple(a.shape))
    layers = [_mcore_layer(config, t, i) for i in range(config.num_layers)]
    for key, (_, split) in layers[0].items():
        a = torch.stack([layer[key][0] for layer in layers])
        if split == "rows":
            chunk = (1, a.shape[1] // tp, *a.shape[2:])
        else:
            chunk = (1, a.shape[1], a.shape[2] // tp) if split == "cols" else (1, *a.shape[1:])
        out["model.decoder.layers." + key] = (a, chunk)
    return out


def _mcore_layer(config: ModelConfig, t: dict, i: int) -> dict[str, tuple[torch.Tensor, str]]:
    """One layer's mcore tensors (TE names, norms fused into the next linear) and how TP splits them."""
    c, src = config, f"layers.{i}."
    out = {f"{fused}{s}": (t[f"{src}{norm}.{s}"], "none")
           for fused, norm in (("self_attention.linear_qkv.layer_norm_", "input_layernorm"),
                               ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm")) for s in ("weight", "bias")}
    for s in ["weight"] + (["bias"] if c.qkv_bias else []):
        q, k, v = (t[f"{src}self_attention.{n}.{s}"] for n in ("query", "key", "value"))
        out[f"self_attention.linear_qkv.{s}"] = (qkv_group_major(q, k, v, c.num_query_groups), "rows")
    for s in ["weight"] + (["bias"] if c.mlp_bias else []):
        up = t[f"{src}mlp.linear_fc1.{s}"]
        gated = torch.cat([t[f"{src}mlp.gate.{s}"], up]) if c.activation == "swiglu" else up  # [gate_all; up_all]
        out[f"mlp.linear_fc1.{s}"] = (gated, "rows")
    out["self_attention.linear_proj.weight"] = (t[src + "self_attention.linear_proj.weight"], "cols")
    out["mlp.linear_fc2.weight"] = (t[src + "mlp.linear_fc2.weight"], "cols")
    if c.proj_bias:
        out["self_attention.linear_proj.bias"] = (t[src + "self_attention.linear_proj.bias"], "none")
    if c.mlp_bias:
        out["mlp.linear_fc2.bias"] = (t[src + "mlp.linear_fc2.bias"], "none")
    return out


def _zarr_dtype(dtype: torch.dtype) -> tuple[str, object]:
    return {torch.bfloat16: ("bfloat16", np.uint16), torch.float32: ("<f4", np.float32),
            torch.float16: ("<f2", np.float16)}[dtype]


def write_zarr_array(directory: Path, array: torch.Tensor, chunks: tuple) -> None:
    """A zarr v2 array as Megatron's zarr strategy leaves it: raw C-order chunks, dtype patched for bf16."""
    directory.mkdir(parents=True)
    name, np_dtype = _zarr_dtype(array.dtype)
    meta = {"chunks": list(chunks), "compressor": None, "dtype": name, "fill_value": None, "filters": None,
            "order": "C", "shape": list(array.shape), "zarr_format": 2}
    (directory / ".zarray").write_text(json.dumps(meta))
    raw = array.view(torch.int16).numpy().view(np_dtype) if array.dtype == torch.bfloat16 else array.numpy()
    grid = [range(-(-s // c)) for s, c in zip(array.shape, chunks)]
    for index in np.ndindex(*[len(g) for g in grid]):
        block = np.zeros(chunks, dtype=np_dtype)  # edge chunks are stored full size
        src = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, array.shape))
        block[tuple(slice(0, sl.stop - sl.start) for sl in src)] = raw[src]
        (directory / ".".join(map(str, index))).write_bytes(block.tobytes())


def write_distckpt(path: Path, config: ModelConfig, tensors: dict, tokenizer_path: Path, tp: int = 1,
                   backend: str = "zarr") -> Path:
    """An extracted mcore .nemo directory whose model_weights/ is a zarr or torch_dist checkpoint."""
    weights = path / "model_weights"
    weights.mkdir(parents=True)
    tok_cfg, members = tokenizer_members(tokenizer_path)
    for name, src in members.items():
        shutil.copy(src, path / name)
    cfg = nemo_yaml(config, tp, 1, tok_cfg)
    cfg.update({"mcore_gpt": True, "transformer_engine": True})
    (path / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    arrays = mcore_global_arrays(config, tensors, tp)
    (weights / "metadata.json").write_text(json.dumps({"sharded_backend": backend, "sharded_backend_version": 1,
                                                       "common_backend": "torch", "common_backend_version": 1}))
    torch.save({}, weights / "common.pt")
    if backend == "zarr":
        for key, (array, chunks) in arrays.items():
            write_zarr_array(weights / key, array, chunks)
        extra = weights / "model.decoder.layers.self_attention.linear_qkv._extra_state"  # a ShardedObject
        extra.mkdir()
        torch.save(None, extra / f"shard_0_{config.num_layers}.pt")
    else:
        write_dcp(weights, {k: a for k, (a, _) in arrays.items()}, {k: c for k, (_, c) in arrays.items()})
    return path


def write_dcp(directory: Path, arrays: dict, chunks: dict) -> None:
    """PyTorch DCP files with each array split into the given chunk shape, as N saving ranks would leave it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class ChunkedSavePlanner(DefaultSavePlanner):
        def create_local_plan(self):
            items = []
            for fqn, array in self.state_dict.items():
                for index in np.ndindex(*[s // c for s, c in zip(array.shape, chunks[fqn])]):
                    offsets = torch.Size(i * c for i, c in zip(index, chunks[fqn]))
                    items.append(WriteItem(
                        index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets, torch.Size(chunks[fqn])),
                                                    properties=TensorProperties.create_from_tensor(array),
                                                    size=array.size())))
            self.plan = SavePlan(items, planner_data=self.mappings)
            return self.plan

        def resolve_data(self, item):
            t = self.state_dict[item.index.fqn]
            for dim, (offset, size) in enumerate(zip(item.tensor_data.chunk.offsets, item.tensor_data.chunk.sizes)):
                t = t.narrow(dim, offset, size)
            return t.contiguous()

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(arrays, storage_writer=dcp.FileSystemWriter(str(directory)), planner=ChunkedSavePlanner(),
                 no_dist=True)


NEMO_GPT = dict(family="nemo_gpt", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                num_query_groups=4, head_dim=8, max_position_embeddings=64, position_embedding="rope",
                rotary_percent=0.5, normalization="layernorm1p", activation="swiglu", qkv_bias=False,
                proj_bias=False, mlp_bias=False, tie_word_embeddings=False)


NEMO_GELU = dict(NEMO_GPT, num_layers=4, ffn_hidden_size=64, position_embedding="learned", rotary_percent=1.0,
                 normalization="layernorm", activation="gelu_tanh", qkv_bias=True, proj_bias=True, mlp_bias=True,
                 tie_word_embeddings=True)


NEMOTRON = dict(NEMO_GPT, family="nemotron", num_query_groups=2, ffn_hidden_size=64, activation="squared_relu")


GPT2 = dict(family="gpt2", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
            num_query_groups=4, head_dim=8, max_position_embeddings=32)


GPT2_HEAD64 = dict(GPT2, hidden_size=128, ffn_hidden_size=96, num_attention_heads=2, num_query_groups=2, head_dim=64)


MEGATRON_MODERN = dict(NEMO_GPT, family="gpt2", num_query_groups=2)


def make_config(fields: dict, tokenizer_path) -> ModelConfig:
    tok = load_tokenizer(tokenizer_path)
    return ModelConfig(**fields, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)


def requests(shape: tuple) -> list[tuple]:
    """(rows, cols) slices a model at TP 1, 2 or 4 asks for, plus one that straddles shard boundaries."""
    out = [(None, None), (slice(1, shape[0] - 1), None if len(shape) == 1 else slice(1, shape[1] - 1))]
    for tp in (1, 2, 4):
        if shape[0] % tp == 0:
            step = shape[0] // tp
            out += [(slice(r * step, (r + 1) * step), None) for r in range(tp)]
        if len(shape) == 2 and shape[1] % tp == 0:
            step = shape[1] // tp
            out += [(None, slice(r * step, (r + 1) * step)) for r in range(tp)]
    return out


def assert_reads_back(source, config: ModelConfig, expected: dict) -> None:
    assert source.config == config
    assert source.names() == set(expected)
    for name, full in expected.items():
        assert source.shape(name) == tuple(full.shape), name
        for rows, cols in requests(tuple(full.shape)):
            got = source.read(name, rows, cols)
            want = full[rows or slice(None)] if full.dim() == 1 else full[rows or slice(None), cols or slice(None)]
            assert got.dtype == full.dtype and torch.equal(got, want), (name, rows, cols)


LEGACY = "model.language_model.encoder."


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


def rewrite(path, change) -> None:
    """Load a torch file, let change() edit the dict, save it back."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)


def raises(match: str):
    return pytest.raises(CheckpointError, match=match)


def small_config(**changes) -> ModelConfig:
    base = dict(family="nemotron", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                num_query_groups=2, head_dim=8, vocab_size=250, max_position_embeddings=64,
                position_embedding="rope", normalization="layernorm1p", activation="squared_relu",
                qkv_bias=False, proj_bias=False, mlp_bias=False, tie_word_embeddings=False)
    return ModelConfig(**{**base, **changes})
