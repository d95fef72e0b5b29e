"""Which slices of the canonical global tensors fill each local parameter of a DecoderStage, and the load.

A local parameter is filled by one or more Pieces: the (rows, cols) slice of a global tensor copied into a
range of the parameter's rows. Fused local layouts come from several pieces: linear_qkv is [q; k; v] of this
rank's heads and query groups, swiglu's linear_fc1 is [gate; up] of this rank's share. Vocabulary rows past
what the checkpoint stores (Megatron padding) stay zero. Only these slices are ever read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fleetgen.model.checkpoint.lazy import canonical_shapes
from fleetgen.model.checkpoint.source import CheckpointError, CheckpointSource
from fleetgen.model.config import ModelConfig
from fleetgen.model.parallel import ParallelState
from fleetgen.model.split import local_kv_heads
from fleetgen.model.transformer import DecoderStage

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class Piece:
    name: str                   # canonical global tensor
    rows: slice                 # of the global tensor
    cols: Optional[slice]       # of the global tensor; None = all (and for 1-D tensors)
    dst: slice                  # rows of the local parameter


def _chunk(total: int, parts: int, index: int) -> slice:
    size = total // parts
    return slice(index * size, (index + 1) * size)


def _whole(name: str, length: int) -> list[Piece]:
    return [Piece(name, slice(0, length), None, slice(0, length))]


def _vocab_rows(name: str, padded_vocab: int, stored_rows: int, ps: ParallelState) -> list[Piece]:
    rows = _chunk(padded_vocab, ps.tp_size, ps.tp_rank)
    stop = min(rows.stop, stored_rows)
    if stop <= rows.start:
        return []  # this rank's rows are all padding
    return [Piece(name, slice(rows.start, stop), None, slice(0, stop - rows.start))]


def _stacked(pieces: list[tuple[str, slice]]) -> list[Piece]:
    """Row slices of several tensors laid one after another in the local parameter."""
    out, at = [], 0
    for name, rows in pieces:
        length = rows.stop - rows.start
        out.append(Piece(name, rows, None, slice(at, at + length)))
        at += length
    return out


def _qkv(config: ModelConfig, ps: ParallelState, prefix: str, kind: str) -> list[Piece]:
    d, tp = config.head_dim, ps.tp_size
    heads, kv = config.num_attention_heads // tp, local_kv_heads(config, tp)
    # TP > groups: rank r serves group r // (TP / groups); otherwise groups [r * kv, (r + 1) * kv)
    first_group = ps.tp_rank * kv if config.num_query_groups >= tp else ps.tp_rank // (tp // config.num_query_groups)
    return _stacked([(f"{prefix}.query.{kind}", slice(ps.tp_rank * heads * d, (ps.tp_rank + 1) * heads * d)),
                     (f"{prefix}.key.{kind}", slice(first_group * d, (first_group + kv) * d)),
                     (f"{prefix}.value.{kind}", slice(first_group * d, (first_group + kv) * d))])


def _fc1(config: ModelConfig, ps: ParallelState, prefix: str, kind: str) -> list[Piece]:
    rows = _chunk(config.ffn_hidden_size, ps.tp_size, ps.tp_rank)
    branches = ["gate", "linear_fc1"] if config.activation == "swiglu" else ["linear_fc1"]
    return _stacked([(f"{prefix}.{branch}.{kind}", rows) for branch in branches])


def _layer_pieces(config: ModelConfig, ps: ParallelState, i: int) -> dict[str, list[Piece]]:
    """Local parameter names (relative to the layer) -> pieces of global layer i."""
    h, g = config.hidden_size, f"layers.{i}"
    attn_cols = _chunk(config.num_attention_heads * config.head_dim, ps.tp_size, ps.tp_rank)
    ffn_cols = _chunk(config.ffn_hidden_size, ps.tp_size, ps.tp_rank)
    norms = ["input_layernorm"] + ([] if config.parallel_residual else ["pre_mlp_layernorm"])
    pieces = {f"{norm}.{kind}": _whole(f"{g}.{norm}.{kind}", h) for norm in norms for kind in ("weight", "bias")}
    pieces["self_attention.linear_qkv.weight"] = _qkv(config, ps, f"{g}.self_attention", "weight")
    pieces["self_attention.linear_proj.weight"] = [
        Piece(f"{g}.self_attention.linear_proj.weight", slice(0, h), attn_cols, slice(0, h))]
    pieces["mlp.linear_fc1.weight"] = _fc1(config, ps, f"{g}.mlp", "weight")
    pieces["mlp.linear_fc2.weight"] = [Piece(f"{g}.mlp.linear_fc2.weight", slice(0, h), ffn_cols, slice(0, h))]
    if config.qkv_bias:
        pieces["self_attention.linear_qkv.bias"] = _qkv(config, ps, f"{g}.self_attention", "bias")
    if config.proj_bias:
        pieces["self_attention.linear_proj.bias"] = _whole(f"{g}.self_attention.linear_proj.bias", h)
    if config.mlp_bias:
        pieces["mlp.linear_fc1.bias"] = _fc1(config, ps, f"{g}.mlp", "bias")
        pieces["mlp.linear_fc2.bias"] = _whole(f"{g}.mlp.linear_fc2.bias", h)
    return pieces


def shard_plan(config: ModelConfig, ps: ParallelState, padded_vocab: int, layer_ids: range,
               stored_rows: dict[str, int]) -> dict[str, list[Piece]]:
    """Local parameter name (as DecoderStage names it) -> pieces; stored_rows: rows of the vocabulary
    tensors as stored."""
    plan = {}
    if ps.is_first_stage:
        plan[WORD_EMBEDDINGS] = _vocab_rows(WORD_EMBEDDINGS, padded_vocab, stored_rows[WORD_EMBEDDINGS], ps)
        if config.position_embedding == "learned":
            plan["embedding.position_embeddings.weight"] = _whole("embedding.position_embeddings.weight",
                                                                  config.max_position_embeddings)
    for j, i in enumerate(layer_ids):
        plan.update({f"layers.{j}.{name}": p for name, p in _layer_pieces(config, ps, i).items()})
    if ps.is_last_stage:
        h = config.hidden_size
        plan["final_layernorm.weight"] = _whole("final_layernorm.weight", h)
        plan["final_layernorm.bias"] = _whole("final_layernorm.bias", h)
        output = WORD_EMBEDDINGS if config.tie_word_embeddings else "output_layer.weight"
        if not (config.tie_word_embeddings and ps.is_first_stage):  # else one parameter serves both
            plan["output_layer.weight"] = _vocab_rows(output, padded_vocab, stored_rows[output], ps)
        if config.output_bias:
            plan["output_layer.bias"] = _vocab_rows("output_layer.bias", padded_vocab,
                                                    stored_rows["output_layer.bias"], ps)
    return plan


def vocab_rows(config: ModelConfig, source: CheckpointSource) -> dict[str, int]:
    """Stored rows of the vocabulary tensors, checked: at least vocab_size rows of hidden_size columns."""
    names = [WORD_EMBEDDINGS] + ([] if config.tie_word_embeddings else ["output_layer.weight"])
    rows = {}
    for name in names + (["output_layer.bias"] if config.output_bias else []):
        shape = source.shape(name)
        wanted = 1 if name.endswith("bias") else 2
        if len(shape) != wanted or shape[0] < config.vocab_size or (wanted == 2 and shape[1] != config.hidden_size):
            raise CheckpointError(f"{name}: shape {list(shape)} does not cover vocab_size {config.vocab_size}"
                                  + ("" if wanted == 1 else f" × hidden_size {config.hidden_size}"))
        rows[name] = shape[0]
    return rows


def load_shard(stage: DecoderStage, source: CheckpointSource, stored_rows: dict[str, int]) -> None:
    """Fill every parameter of the stage with this rank's slices, read from the source."""
    plan = shard_plan(stage.config, stage.ps, stage.padded_vocab, stage.layer_ids, stored_rows)
    params = dict(stage.named_parameters())
    if set(params) != set(plan):
        raise RuntimeError(f"shard plan and stage disagree on {sorted(set(params) ^ set(plan))}")
    # vocabulary tensors are left out: vocab_rows() checked them, and their stored rows vary
    expected = {name: shape for name, shape in canonical_shapes(stage.config, vocab_rows=0).items()
                if name not in stored_rows}
    with torch.no_grad():
        for local, param in params.items():
            param.zero_()  # vocabulary padding stays zero
            for piece in plan[local]:
                if piece.name in expected and tuple(source.shape(piece.name)) != expected[piece.name]:
                    raise CheckpointError(f"{piece.name}: shape {list(source.shape(piece.name))}, the config "
                                          f"implies {list(expected[piece.name])}")
                _copy(param, piece, source.read(piece.name, piece.rows, piece.cols))


def _copy(param: torch.Tensor, piece: Piece, tensor: torch.Tensor) -> None:
    target = param[piece.dst]
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{piece.name}: the slice [{piece.rows.start}:{piece.rows.stop}] read has shape "
                              f"{list(tensor.shape)}, expected {list(target.shape)}")
    target.copy_(tensor)
