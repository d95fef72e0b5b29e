"""What every checkpoint format provides: the architecture, the tokenizer, and lazily sliced global tensors.

A format reader (hf.py, nemo.py, megatron.py, distckpt.py) presents its checkpoint as *global*, unsharded
tensors under the canonical names below, whatever split or fused layout the files use. The model side
(model/shard.py) asks each rank's slices of those tensors; a reader reads only the bytes those
slices need (safetensors slices, memory-mapped torch.load, single zarr chunks), so no rank ever holds the
full model.

Canonical global names (``{i}`` is the global layer index, 0-based; shapes are global):

    embedding.word_embeddings.weight                  [V, H]   V = rows stored (may exceed vocab_size)
    embedding.position_embeddings.weight              [P, H]   position_embedding == "learned" only
    layers.{i}.input_layernorm.weight / .bias         [H]
    layers.{i}.self_attention.query.weight            [heads * head_dim, H]   head-major rows
    layers.{i}.self_attention.key.weight              [groups * head_dim, H]
    layers.{i}.self_attention.value.weight            [groups * head_dim, H]
    layers.{i}.self_attention.{query,key,value}.bias  [.. * head_dim]         qkv_bias only
    layers.{i}.self_attention.linear_proj.weight      [H, heads * head_dim]
    layers.{i}.self_attention.linear_proj.bias        [H]                      proj_bias only
    layers.{i}.pre_mlp_layernorm.weight / .bias       [H]                      not with parallel_residual
    layers.{i}.mlp.gate.weight / .bias                [F, H]                   swiglu only (the silu branch)
    layers.{i}.mlp.linear_fc1.weight / .bias          [F, H]                   swiglu: the "up" branch
    layers.{i}.mlp.linear_fc2.weight                  [H, F]
    layers.{i}.mlp.linear_fc2.bias                    [H]
    final_layernorm.weight / .bias                    [H]
    output_layer.weight                               [V, H]   absent when tie_word_embeddings
    output_layer.bias                                 [V]      output_bias only

Norm weights are exactly as stored: for normalization == "layernorm1p" the stored weight is zero-centred and
the model adds 1. RoPE layouts are the checkpoint's own (rotary_interleaved says which); no permutation.
Every layernorm has a bias (LayerNorm1P keeps one even when the linears have none).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

from fleetgen.model.config import ModelConfig

if TYPE_CHECKING:  # no torch on the login node: the launcher reads checkpoint metadata only (open.py)
    import torch


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names the file and, where there is one, the key."""


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...


class CheckpointSource(Protocol):
    config: ModelConfig

    def tokenizer(self) -> Tokenizer: ...

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        """The [rows, cols] slice of a global tensor (a 1-D tensor takes rows only), in its stored dtype."""
        ...
