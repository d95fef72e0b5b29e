"""Which replica a request should go to for its prompt's prefix: the one whose KV cache holds it.

A server reuses a prompt's leading KV blocks that it computed before (model.prefix_caching: a shared system
prompt and few-shot examples, the other samples of a record). So, like sglang-router's cache-aware policy, the
driver sends a prompt to the replica that was first sent its longest known prefix (its owner), and spreads
work only when that replica cannot take it. A prefix is known by the hashes of the prompt's leading
CHUNK_CHARS-character chunks, each chained to the one before, and of the whole prompt (the samples of a record,
a prompt asked again); a bounded table remembers each hash's owner, least recently used first out.

Groups whose owner is busy wait parked, at most PARKED_MOST of them: a replica with a free slot takes a parked
group it owns first, then fresh work, and when the park is full the group parked longest, whoever owns it. So
a busy owner never holds others idle, and a batch that is all one prefix spreads over every replica.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Optional

CHUNK_CHARS = 256      # about 64 tokens: 4 KV blocks of 16
WHOLE_MIN_CHARS = 64   # a prompt this long is known by its whole text too (about one KV block)
TABLE_MOST = 1 << 16   # hashes remembered: a few MB
PARKED_MOST = 64       # groups held back for a busy owner: how far ahead the driver looks for another's work


def prefix_keys(text: str) -> list[int]:
    """The prompt's chained chunk hashes, shortest prefix first, then its whole text's hash; [] for a prompt
    too short for a KV block to be worth following."""
    if len(text) < WHOLE_MIN_CHARS:
        return []
    keys, key = [], 0
    for start in range(0, len(text) - CHUNK_CHARS + 1, CHUNK_CHARS):
        key = hash((key, text[start:start + CHUNK_CHARS]))
        keys.append(key)
    keys.append(hash((len(text), text)))
    return keys


class PrefixTable:
    """Each known prefix hash's owner: the replica first sent it (or, once that one is lost, the next)."""

    def __init__(self, most: int = TABLE_MOST):
        self._owners: OrderedDict[int, object] = OrderedDict()
        self._most = most

    def owner(self, keys: list[int]):
        """The owner of the longest known prefix among keys, if it is healthy; else None."""
        for key in reversed(keys):
            replica = self._owners.get(key)
            if replica is not None:
                return replica if replica.state == "healthy" else None
        return None

    def claim(self, keys: list[int], replica) -> None:
        """replica computes these prefixes now: it owns each one without a healthy owner."""
        owners = self._owners
        for key in keys:
            current = owners.get(key)
            if current is None or current.state != "healthy":
                owners[key] = replica
            owners.move_to_end(key)
        while len(owners) > self._most:
            owners.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owners)


class Parked:
    """Groups waiting for their busy owner: by owner, and all of them oldest first. A group taken one way stays
    in the other queue, marked, until it reaches that queue's front or the queues are rebuilt."""

    def __init__(self, most: int = PARKED_MOST):
        self._most = most
        self._all: deque[list] = deque()      # [items, keys, owner, taken]
        self._by_owner: dict[int, deque[list]] = {}
        self._count = self._stored = 0        # parked; entries held, taken ones included

    def __len__(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count >= self._most

    def park(self, items: list, keys: list[int], owner) -> None:
        entry = [items, keys, owner, False]
        self._all.append(entry)
        self._by_owner.setdefault(id(owner), deque()).append(entry)
        self._count += 1
        self._stored += 2  # in both queues

    def take_for(self, replica) -> Optional[tuple[list, list[int]]]:
        """The oldest group parked for replica."""
        return self._first(self._by_owner.get(id(replica)))

    def take_oldest(self) -> Optional[tuple[list, list[int]]]:
        return self._first(self._all)

    def take_all_for(self, replica) -> list[list]:
        """The items of every group parked for replica (it was lost)."""
        groups = []
        while (group := self.take_for(replica)) is not None:
            groups.append(group[0])
        return groups

    def _first(self, queue: Optional[deque]) -> Optional[tuple[list, list[int]]]:
        while queue:
            entry = queue.popleft()
            self._stored -= 1
            if not entry[3]:
                entry[3] = True
                self._count -= 1
                if self._stored > 2 * self._count + self._most:  # taken entries left behind: drop them
                    self._rebuild()
                return entry[0], entry[1]
        return None

    def _rebuild(self) -> None:
        self._all = deque(entry for entry in self._all if not entry[3])
        self._by_owner = {}
        for entry in self._all:
            self._by_owner.setdefault(id(entry[2]), deque()).append(entry)
        self._stored = 2 * len(self._all)
