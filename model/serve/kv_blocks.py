"""Which KV-cache blocks each sequence holds, and which full blocks are kept for reuse: the scheduler's side of
a paged cache with prefix reuse (vLLM's automatic prefix caching). Plain Python, no torch.

The cache is num_blocks blocks of block_size positions. A sequence holds a block table, the blocks of its
positions in order. A block whose block_size tokens are all written is full; a full block is keyed by its
tokens and its parent's key (so a key names the whole prefix up to the block's end) and stays findable by
that key until its memory is taken for something else. A new sequence starts from the longest chain of full
blocks whose keys match its prompt: those positions are not computed again. Blocks are reference-counted: a
block shared by several sequences (a common system prompt, a record's samples) is freed when the last one
lets go. Free blocks are taken least recently freed first, so a prefix used a moment ago is the last to go;
a sequence's blocks are freed tail first, so its shared head outlives its own tail.

Admission is by free blocks, not by slots: the caller asks for the blocks a sequence needs now and as it
grows; a False answer means the caller preempts (frees a sequence, to recompute it later) or waits.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional


class BlockKey(tuple):
    """(parent key or None, the block's tokens): equal keys mean equal prefixes, compared in full (a hash
    collision can never hand out another prompt's keys and values)."""


@dataclass
class Block:
    id: int
    refs: int = 0
    key: Optional[BlockKey] = None  # set once full and registered


@dataclass
class Table:
    """One sequence's blocks, and how many of its leading tokens are registered as full blocks."""
    blocks: list[int] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)  # of its first len(keys) blocks, all full


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a paged cache needs blocks: got {num_blocks} of {block_size} positions")
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self._cached: dict[BlockKey, int] = {}
        self.tables: dict[object, Table] = {}
        self.hit_tokens = self.computed_tokens = 0  # prompt tokens reused and computed, over all admissions

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- a sequence's life

    def cached_prefix(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of prompt admit() would find in the cache now."""
        return len(self._longest_prefix(prompt)) * self.block_size

    def admit(self, seq: object, prompt: Sequence[int], reserve: int, reuse: bool = True) -> Optional[int]:
        """Give seq the blocks for its first `reserve` positions (≥ its prompt), reusing the longest cached
        prefix of prompt (unless not reuse: every token computed). Returns how many prompt tokens are already
        in the cache (a multiple of block_size, and never the whole prompt: its last token is computed for its
        logits), or None, taking nothing, when the free blocks do not suffice."""
        if seq in self.tables:
            raise ValueError(f"sequence {seq!r} is admitted already")
        hits = self._longest_prefix(prompt) if reuse else []
        needed = self.blocks_for(max(reserve, len(prompt))) - len(hits)
        reusable_free = sum(1 for b in hits if self.blocks[b].refs == 0)  # counted in free_blocks, not takeable
        if needed > self.free_blocks - reusable_free:
            return None
        table = Table()
        for block in hits:
            self._hold(block)
            table.blocks.append(block)
            table.keys.append(self.blocks[block].key)
        table.blocks += self._take(needed)
        self.tables[seq] = table
        cached = len(hits) * self.block_size
        self.hit_tokens += cached
        self.computed_tokens += len(prompt) - cached
        return cached

    def grow(self, seq: object, positions: int) -> bool:
        """Make seq's table cover `positions` positions; False (nothing taken) when blocks run out."""
        table = self.tables[seq]
        needed = self.blocks_for(positions) - len(table.blocks)
        if needed <= 0:
            return True
        if needed > self.free_blocks:
            return False
        table.blocks += self._take(needed)
        return True

    def written(self, seq: object, tokens: Sequence[int]) -> None:
        """seq's cache now holds the keys and values of tokens (its whole sequence so far): register its newly
        full blocks for reuse. A block whose prefix is cached already under another block stays private."""
        if not self.prefix_caching:
            return
        table, size = self.tables[seq], self.block_size
        for i in range(len(table.keys), len(tokens) // size):
            parent = table.keys[-1] if table.keys else None
            key = BlockKey((parent, tuple(tokens[i * size:(i + 1) * size])))
            table.keys.append(key)
            block = self.blocks[table.blocks[i]]
            if key not in self._cached and block.key is None:
                block.key = key
                self._cached[key] = block.id

    def free(self, seq: object) -> None:
        """seq is finished, cancelled or preempted: let go of its blocks, tail first (its own tail is less
        likely shared than its head, so it is taken back first)."""
        table = self.tables.pop(seq)
        for block in reversed(table.blocks):
            self._release(block)

    # ---- blocks

    def _longest_prefix(self, prompt: Sequence[int]) -> list[int]:
        if not self.prefix_caching:
            return []
        hits, parent, size = [], None, self.block_size
        for i in range((len(prompt) - 1) // size):  # the last prompt token is always computed
            key = BlockKey((parent, tuple(prompt[i * size:(i + 1) * size])))
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
            parent = key
        return hits

    def _take(self, count: int) -> list[int]:
        taken = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.key is not None:  # evicted: its prefix is no longer findable
                del self._cached[block.key]
                block.key = None
            block.refs = 1
            taken.append(block_id)
        return taken

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.refs == 0:
            del self._free[block_id]
        block.refs += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.refs -= 1
        if block.refs == 0:
            self._free[block_id] = None  # most recently freed: taken last
