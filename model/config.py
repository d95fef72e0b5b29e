"""The architecture of a decoder, as read from a checkpoint.

One decoder serves every supported family; these fields are the switches. Loaders fill them from the
checkpoint's own metadata (config.json, model_config.yaml, Megatron args), never from guesses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

POSITION_EMBEDDINGS = ("learned", "rope")
NORMALIZATIONS = ("layernorm", "layernorm1p")  # layernorm1p: scale = weight + 1 (zero-centred gamma)
ACTIVATIONS = ("gelu_tanh", "gelu", "swiglu", "squared_relu")


@dataclass(frozen=True)
class ModelConfig:
    family: str                    # "gpt2" | "gptj" | "nemo_gpt" | "nemotron": for messages and recipes
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int           # per branch: swiglu's fused fc1 has 2 * ffn_hidden_size rows
    num_attention_heads: int
    num_query_groups: int          # == num_attention_heads unless grouped-query attention
    head_dim: int                  # Megatron's kv_channels
    vocab_size: int                # logits at ids >= vocab_size are padding and never sampled
    max_position_embeddings: int
    position_embedding: str = "learned"
    rotary_percent: float = 1.0    # fraction of each head's dims that rotate
    rotary_interleaved: bool = False  # GPT-J rotates pairs (2i, 2i+1); NeMo/HF-neox rotate halves
    rotary_base: float = 10000.0
    normalization: str = "layernorm"
    layernorm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    parallel_residual: bool = False  # GPT-J: x + attn(ln_1(x)) + mlp(ln_1(x)); no pre-MLP norm
    qkv_bias: bool = True
    proj_bias: bool = True         # attention output projection
    mlp_bias: bool = True
    output_bias: bool = False      # lm head bias (GPT-J)
    tie_word_embeddings: bool = True
    make_vocab_size_divisible_by: int = 128
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None

    def __post_init__(self):
        for name, allowed in (("position_embedding", POSITION_EMBEDDINGS),
                              ("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model config: {name}={getattr(self, name)!r} is not one of {allowed}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model config: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_query_groups={self.num_query_groups}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    def padded_vocab_size(self, tensor_parallel: int, stored_rows: int = 0) -> int:
        """Megatron's padding: a multiple of make_vocab_size_divisible_by * TP, covering stored rows too."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return math.ceil(max(self.vocab_size, stored_rows) / multiple) * multiple

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
