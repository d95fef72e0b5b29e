"""A static, preallocated key/value cache for the layers of one pipeline stage (gpt-fast style).

One buffer each for keys and values, [local layers, max_batch slots, max_seq_len, local kv heads, head_dim],
allocated once: nothing is reallocated as sequences grow. Reads return a slot's first `length` positions, so
the keys and values attention sees grow with the context (unlike gpt-fast, which attends over the whole
buffer under a mask). A slot holds one sequence; position p of a slot holds the keys and values of that
sequence's token p.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_batch: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, max_batch, max_seq_len, kv_heads, head_dim)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
        """Store k, v [n, s, kv_heads, head_dim] of slots [n] at positions [n, s]."""
        rows = slots[:, None]  # [n, 1] broadcasts against positions [n, s]
        self.k[layer, rows, positions] = k
        self.v[layer, rows, positions] = v

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) of slots [n]: [n, length, kv_heads, head_dim] each."""
        return self.k[layer, slots, :length], self.v[layer, slots, :length]

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def describe(self) -> str:
        layers, slots, seq, heads, dim = self.k.shape
        return (f"KV cache {self.bytes / 2**20:.1f} MiB: {layers} layers × {slots} slots × {seq} tokens × "
                f"{heads} kv heads × {dim} ({str(self.k.dtype).removeprefix('torch.')})")
