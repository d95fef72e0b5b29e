"""A static, preallocated key/value cache for the layers of one pipeline stage (gpt-fast style).

One buffer each for keys and values, [local layers, max_batch slots, max_seq_len + 1, local kv heads, head_dim],
allocated once: nothing is reallocated as sequences grow. A slot holds one sequence; position p of a slot holds
the keys and values of that sequence's token p. The extra last position is scratch: a decode step runs over a
fixed number of slot rows (model/generate.py), and rows without a sequence write there, where no real row ever
reads.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_batch: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, max_batch, max_seq_len + 1, kv_heads, head_dim)
        self._hold(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   max_seq_len)

    def _hold(self, k: torch.Tensor, v: torch.Tensor, max_seq_len: int) -> None:
        self.k, self.v = k, v
        self.max_batch, self.max_seq_len = k.shape[1], max_seq_len
        self.scratch = max_seq_len  # the position padding rows write to

    def slots(self, first: int, count: int) -> KVCache:
        """Slots [first, first + count) as a cache of their own, slot first being its slot 0: views of this
        one, no copy. Each lane of decode steps (model/generate.py) runs over its own slots."""
        view = object.__new__(KVCache)
        view._hold(self.k[:, first:first + count], self.v[:, first:first + count], self.max_seq_len)
        return view

    def update(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
        """Store k, v [n, s, kv_heads, head_dim] of slots [n] at positions [n, s], in place."""
        rows = slots[:, None]  # [n, 1] broadcasts against positions [n, s]
        # never compiled (model/generate.py): traced, a store into a view of the cache is functionalized into
        # a copy of the whole cache
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v

    def window(self, layer: int, rows: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, rows) at positions [0, context): views of the cache, no copy,
        [rows, context, kv_heads, head_dim] each."""
        return self.k[layer, :rows, :context], self.v[layer, :rows, :context]

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def describe(self) -> str:
        layers, slots, seq, heads, dim = self.k.shape
        return (f"KV cache {self.bytes / 2**20:.1f} MiB: {layers} layers × {slots} slots × {seq - 1} tokens "
                f"(+1 scratch) × {heads} kv heads × {dim} ({str(self.k.dtype).removeprefix('torch.')})")
