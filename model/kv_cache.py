"""A paged key/value cache for the layers of one pipeline stage: fixed-size blocks and per-slot block tables.

One buffer each for keys and values, [local layers, num_blocks + 1, block_size, local kv heads, head_dim],
allocated once. A slot (a row of decode steps, model/generate.py) holds one sequence; its row of the block table
names the block of each block_size positions of that sequence, in order: position p lives at offset
p % block_size of block table[slot, p // block_size]. Which blocks a sequence holds, and which are shared by
sequences with a common prefix, is the scheduler's business (model/serve/kv_blocks.py); the runner only copies
its choices into the table.

The table is a static buffer [max_batch, blocks_per_slot + 1] on the device, so that a captured decode graph
(model/cuda_graphs.py) reads each step's tables from the same memory. Its last column, and every entry no
sequence uses, is the scratch block (the extra one): padding rows and padding positions write there, where no
real row ever reads. Until told otherwise each slot's row is its own run of blocks, slot s holding blocks
[s * blocks_per_slot, (s + 1) * blocks_per_slot) when the cache has that many: a static cache read through
tables, what plans without block tables (tests, generate_greedy) use.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fleetgen.model.split import BLOCK_SIZE


class KVCache:
    def __init__(self, num_layers: int, max_batch: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, num_blocks: Optional[int] = None,
                 block_size: int = BLOCK_SIZE):
        """num_blocks None: one run of blocks for each slot's max_seq_len positions (a static cache's memory)."""
        per_slot = -(-max_seq_len // block_size)
        num_blocks = max_batch * per_slot if num_blocks is None else num_blocks
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block of {block_size} positions, got {num_blocks}")
        shape = (num_layers, num_blocks + 1, block_size, kv_heads, head_dim)
        table = torch.full((max_batch, per_slot + 1), num_blocks, dtype=torch.long, device=device)
        windows = WindowBuffers(dtype) if torch.device(device).type == "cpu" else None
        self._hold(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   table, max_seq_len, windows)
        self.reset_tables(torch.arange(max_batch, device=device))

    def _hold(self, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, max_seq_len: int,
              windows: Optional[WindowBuffers]) -> None:
        self.k, self.v, self.table, self._windows = k, v, table, windows
        self.num_blocks, self.block_size = k.shape[1] - 1, k.shape[2]
        self.max_batch, self.max_seq_len = table.shape[0], max_seq_len
        self.scratch = (table.shape[1] - 1) * self.block_size  # the position padding rows write to
        self._flat_k = k.view(k.shape[0], -1, *k.shape[3:])  # [layers, blocks * block_size, kv_heads, d]
        self._flat_v = v.view(v.shape[0], -1, *v.shape[3:])

    @property
    def identity_tables(self) -> bool:
        """Whether every slot can hold its own run of blocks (reset_tables): plans may then omit block tables."""
        return self.max_batch * (self.table.shape[1] - 1) <= self.num_blocks

    def slots(self, first: int, count: int) -> KVCache:
        """Slots [first, first + count) as a cache of their own, slot first being its slot 0: the same blocks,
        a view of the table, no copy. Each lane of decode steps (model/generate.py) runs over its own slots."""
        view = object.__new__(KVCache)
        view._hold(self.k, self.v, self.table[first:first + count], self.max_seq_len, self._windows)
        return view

    def set_tables(self, slots: torch.Tensor, blocks: torch.Tensor) -> None:
        """Slots [n] hold blocks [n, w] (-1: none), the rest of their rows none."""
        rows = torch.full((slots.numel(), self.table.shape[1]), self.num_blocks, dtype=torch.long,
                          device=self.table.device)
        width = min(blocks.shape[1], rows.shape[1] - 1)
        rows[:, :width] = torch.where(blocks[:, :width] < 0, self.num_blocks, blocks[:, :width])
        self.table[slots] = rows

    def reset_tables(self, slots: torch.Tensor) -> None:
        """Slots [n] hold their own runs of blocks, as in a static cache (none when the cache is smaller)."""
        per_slot = self.table.shape[1] - 1
        if not self.identity_tables:
            self.table[slots] = self.num_blocks
            return
        runs = slots[:, None] * per_slot + torch.arange(per_slot, device=slots.device)  # [n, per_slot]
        self.set_tables(slots, runs)

    def _index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat positions in the blocks of slots [n] at positions [n, s]."""
        blocks = self.table[slots[:, None], positions // self.block_size]  # [n, s]
        return blocks * self.block_size + positions % self.block_size

    def update(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
        """Store k, v [n, s, kv_heads, head_dim] of slots [n] at positions [n, s], in place."""
        index = self._index(slots, positions).flatten()
        # never compiled (model/generate.py): traced, a store into a view of the cache is functionalized into
        # a copy of the whole cache
        self._flat_k[layer].index_copy_(0, index, k.flatten(0, 1))
        self._flat_v[layer].index_copy_(0, index, v.flatten(0, 1))

    def window(self, layer: int, slots: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [n] at positions [0, context), gathered block by block through their tables
        into a contiguous copy, [n, context, kv_heads, head_dim] each, valid until the next call (on CPU the
        copies go to buffers every layer reuses). The copy runs at memcpy speed, which on a CPU made decode steps
        as fast as a static cache read in place at 160 positions, but 1.5-2x slower at 500
        (benchmarks/paged_cache.py): a kernel that reads blocks in place would remove it."""
        n, used = slots.numel(), -(-context // self.block_size)
        blocks = self.table[slots, :used].flatten()  # [n * used]
        if self._windows is None:  # CUDA: its caching allocator hands the same memory back
            k, v = self.k[layer].index_select(0, blocks), self.v[layer].index_select(0, blocks)
        else:
            k, v = self._windows.take((blocks.numel(), *self.k.shape[2:]))
            torch.index_select(self.k[layer], 0, blocks, out=k)
            torch.index_select(self.v[layer], 0, blocks, out=v)
        shape = (n, used * self.block_size, *self.k.shape[3:])
        return k.view(shape)[:, :context], v.view(shape)[:, :context]

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def describe(self) -> str:
        layers, blocks, size, heads, dim = self.k.shape
        return (f"KV cache {self.bytes / 2**20:.1f} MiB: {layers} layers × {blocks - 1} blocks (+1 scratch) × "
                f"{size} tokens × {heads} kv heads × {dim} ({str(self.k.dtype).removeprefix('torch.')}), "
                f"{self.max_batch} slots of up to {self.max_seq_len} tokens")


class WindowBuffers:
    """The memory KVCache.window copies keys and values into on a CPU, shared by every layer and lane and grown
    to the largest window asked. A fresh tensor a call costs its page faults: glibc maps an allocation over
    32 MB afresh and unmaps it when freed, so gathering 64 rows × 12 blocks of GPT-2 small's keys took 14.6 ms
    into a new tensor and 2.0 ms into a reused one, and 64-row decode steps cost 6x 16-row ones."""

    def __init__(self, dtype: torch.dtype):
        self._buffer = torch.empty(2, 0, dtype=dtype)

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Two contiguous tensors of shape, for keys and values."""
        numel = math.prod(shape)
        if self._buffer.shape[1] < numel:
            self._buffer = torch.empty(2, numel, dtype=self._buffer.dtype)
        return self._buffer[0, :numel].view(shape), self._buffer[1, :numel].view(shape)
