"""The decoder: one pipeline stage's share of a GPT-style model, switched by ModelConfig.

A DecoderStage holds the word/position embeddings (first stage), its range of transformer layers, and the
final norm plus output layer (last stage). Its methods are the steps the pipeline driver (model/generate.py)
calls: embed -> prefill_layers or decode_layers -> logits, with activations passed between stages there.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fleetgen.model.config import ModelConfig
from fleetgen.model.kv_cache import KVCache
from fleetgen.model.layers import (ACTIVATIONS, ColumnParallelLinear, LayerNorm, RowParallelLinear,
                                   VocabParallelEmbedding, apply_rotary, linear, rotary_tables, swiglu)
from fleetgen.model.parallel import ParallelState
from fleetgen.model.split import check_split, local_kv_heads, stage_layers


def decode_mask(positions: torch.Tensor, context: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, 1, s, context]: 0 where a query at positions [n, s] sees a cached position (its own and earlier ones),
    -inf elsewhere. Made once a step in the attention's dtype, so no layer converts a boolean mask again."""
    visible = torch.arange(context, device=positions.device) <= positions[..., None]  # [n, s, context]
    return torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill_(
        ~visible, float("-inf"))[:, None]


class LayerParts(NamedTuple):
    """How a decode step runs each layer's parts around attention: (block, x, rope) -> (normed x, q, k, v)
    and (block, x, normed x, attended) -> the layer's output."""
    before_attention: Callable
    after_attention: Callable


class ParallelAttention(nn.Module):
    def __init__(self, config: ModelConfig, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.heads = config.num_attention_heads // ps.tp_size
        self.kv_heads = local_kv_heads(config, ps.tp_size)
        qkv_local = (self.heads + 2 * self.kv_heads) * config.head_dim  # rows [q; k; v] of this rank
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, qkv_local * ps.tp_size, ps=ps,
                                               bias=config.qkv_bias, gather_output=False, dtype=dtype)
        self.linear_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                             ps=ps, bias=config.proj_bias, input_is_parallel=True, dtype=dtype)

    def project(self, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of the normed input h [n, s, H], rotated: [n, s, heads | kv_heads, d]."""
        n, s, _ = h.shape
        d = self.config.head_dim
        qkv = self.linear_qkv(h)  # [n, s, (heads + 2 * kv_heads) * d]
        qk, v = qkv.split([(self.heads + self.kv_heads) * d, self.kv_heads * d], dim=-1)
        qk = qk.view(n, s, self.heads + self.kv_heads, d)
        if rope is not None:  # queries and keys in one rotation: half the small kernels of a decode step
            qk = apply_rotary(qk, *rope, self.config.rotary_interleaved)
        q, k = qk.split([self.heads, self.kv_heads], dim=2)
        return q, k, v.view(n, s, self.kv_heads, d)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, cache: KVCache, layer: int,
               slots: torch.Tensor, writes: torch.Tensor) -> torch.Tensor:
        """Store k, v in the cache, then attend: [n, s, heads * d], before the output projection. Every row
        stores before any reads, so a row may read blocks that another row of the same step writes (a prompt
        shared by the samples of one request, model/serve/kv_blocks.py)."""
        n, s = q.shape[:2]
        cache.update(layer, slots, writes, k, v)
        if mask is not None:  # attends to cached positions, read through the slots' block tables
            k, v = cache.window(layer, slots, mask.shape[-1])  # [n, context, kv_heads, d]
        return self._attend(q, k, v, mask).reshape(n, s, self.heads * self.config.head_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """mask None: causal over fresh keys (prefill starts every row at position 0)."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [n, heads, s, d]
            attn_mask=mask, is_causal=mask is None, enable_gqa=self.kv_heads != self.heads)
        return out.transpose(1, 2)  # [n, s, heads, d]


class ParallelMLP(nn.Module):
    def __init__(self, config: ModelConfig, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        gated = config.activation == "swiglu"
        self.activation = swiglu if gated else ACTIVATIONS[config.activation]
        fc1_rows = config.ffn_hidden_size * (2 if gated else 1)  # swiglu: [gate; up] on every rank
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, fc1_rows, ps=ps, bias=config.mlp_bias,
                                               gather_output=False, dtype=dtype)
        self.linear_fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, ps=ps,
                                            bias=config.mlp_bias, input_is_parallel=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.activation(self.linear_fc1(x)))


def _norm(config: ModelConfig, ps: ParallelState, dtype: torch.dtype) -> LayerNorm:
    return LayerNorm(config.hidden_size, config.layernorm_eps, config.normalization == "layernorm1p",
                     ps.device, dtype)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = _norm(config, ps, dtype)
        self.self_attention = ParallelAttention(config, ps, dtype)
        if not config.parallel_residual:
            self.pre_mlp_layernorm = _norm(config, ps, dtype)
        self.mlp = ParallelMLP(config, ps, dtype)

    def forward(self, x: torch.Tensor, rope, mask, cache: KVCache, layer: int, slots: torch.Tensor,
                writes: torch.Tensor) -> torch.Tensor:
        h, q, k, v = self.before_attention(x, rope)
        return self.after_attention(x, h, self.self_attention.attend(q, k, v, mask, cache, layer, slots, writes))

    # A layer in three parts: the two whose shapes depend only on the rows, which a compiled decode step
    # compiles once for every layer (model/generate.py), and between them the attention over the cache.
    def before_attention(self, x: torch.Tensor, rope):
        """The normed input and its rotated queries, keys and values."""
        h = self.input_layernorm(x)
        return (h, *self.self_attention.project(h, rope))

    def after_attention(self, x: torch.Tensor, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        attention = self.self_attention.linear_proj(attended)
        if self.parallel_residual:  # GPT-J: attention and MLP both read ln_1(x)
            return x + attention + self.mlp(h)
        x = x + attention
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig, ps: ParallelState, padded_vocab: int, dtype: torch.dtype):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, config.hidden_size, ps=ps, dtype=dtype)
        self.position_embeddings = None
        if config.position_embedding == "learned":  # small: every TP rank holds all of it
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                    device=ps.device, dtype=dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(tokens)  # [n, s, H]
        if self.position_embeddings is not None:
            h = h + self.position_embeddings(positions)
        return h


class DecoderStage(nn.Module):
    def __init__(self, config: ModelConfig, ps: ParallelState, padded_vocab: int, dtype: torch.dtype):
        super().__init__()
        check_split(config, ps.tp_size, ps.pp_size)
        self.config, self.ps, self.padded_vocab, self.dtype = config, ps, padded_vocab, dtype
        self.layer_ids = stage_layers(config, ps.pp_size, ps.pp_rank)
        self.kv_heads = local_kv_heads(config, ps.tp_size)
        if ps.is_first_stage:
            self.embedding = Embedding(config, ps, padded_vocab, dtype)
        self.layers = nn.ModuleList(TransformerLayer(config, ps, dtype) for _ in self.layer_ids)
        if ps.is_last_stage:
            self.final_layernorm = _norm(config, ps, dtype)
            self.output_layer = ColumnParallelLinear(config.hidden_size, padded_vocab, ps=ps,
                                                     bias=config.output_bias, gather_output=True, dtype=dtype)
            if config.tie_word_embeddings and ps.is_first_stage:
                self.output_layer.weight = self.embedding.word_embeddings.weight
        self.requires_grad_(False)  # inference only

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens, positions)  # [n, s, H]

    def prefill_layers(self, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache,
                       writes: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prompts [n, s] at positions [n, s], stored in slots [n] at writes [n, s]. mask None: every row starts
        at position 0, causal over its own fresh keys; else (decode_mask) rows continue a prefix already in the
        cache and attend through their block tables."""
        return self._layers(h, self._rope(positions), mask, cache, slots, writes)

    def decode_layers(self, h: torch.Tensor, positions: torch.Tensor, writes: torch.Tensor, mask: torch.Tensor,
                      cache: KVCache, parts: Optional[LayerParts] = None) -> torch.Tensor:
        """One token for each of slots [0, n): h [n, 1, H] at positions [n, 1], stored at writes [n, 1];
        mask [n, 1, 1, context] (decode_mask) says which cached positions each row sees. Shapes depend only on
        (n, context), so a GPU captures this step once per bucket (model/cuda_graphs.py). parts: each layer's
        parts around attention, compiled (model/generate.py); None runs the layers as they are."""
        slots = torch.arange(h.shape[0], device=h.device)
        rope = self._rope(positions)
        if parts is None:
            return self._layers(h, rope, mask, cache, slots, writes)
        for layer, block in enumerate(self.layers):
            normed, q, k, v = parts.before_attention(block, h, rope)
            attended = block.self_attention.attend(q, k, v, mask, cache, layer, slots, writes)
            h = parts.after_attention(block, h, normed, attended)
        return h

    def _rope(self, positions: torch.Tensor):
        if self.config.position_embedding != "rope":
            return None
        return rotary_tables(positions, self.config.rotary_dim, self.config.rotary_base,
                             self.config.rotary_interleaved)  # shared by every layer of the stage

    def _layers(self, h, rope, mask, cache: KVCache, slots: torch.Tensor, writes: torch.Tensor) -> torch.Tensor:
        for layer, block in enumerate(self.layers):
            h = block(h, rope, mask, cache, layer, slots, writes)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the real vocabulary (padding columns dropped): [..., vocab_size]."""
        out = self.output_layer(self.final_layernorm(h))  # [..., padded_vocab]
        return out[..., :self.config.vocab_size].float()

    def local_logits(self, h: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This TP rank's columns of the logits over the real vocabulary, [..., up to padded_vocab / TP] in the
        model's dtype (what an argmax needs: no fp32 copy of a 256k-wide row), and the vocabulary id of its first
        column. Padding columns come last, so a rank keeps a prefix of its columns; one whose columns are all
        padding keeps one, at -inf."""
        out = linear(self.final_layernorm(h), self.output_layer.weight, self.output_layer.bias)
        start = self.ps.tp_rank * out.shape[-1]
        real = min(out.shape[-1], self.config.vocab_size - start)
        if real <= 0:
            return out[..., :1].clone().fill_(float("-inf")), start
        return out[..., :real], start

    def describe(self) -> str:
        first, last = self.layer_ids[0], self.layer_ids[-1]
        return f"layers {first}-{last} of {self.config.num_layers}"
