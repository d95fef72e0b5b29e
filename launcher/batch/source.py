"""Work items in input order, skipping finished ones, grouped into requests; items given back come first.

Only what is in flight (and one item looked ahead) is held: records are read from the file on demand.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator, Optional

from fleetgen.launcher.batch.formats import Item, Record
from fleetgen.launcher.batch.ledger import Bits


class WorkSource:
    def __init__(self, records: Iterable[Record], fmt, samples: int, done: Bits, per_request: int):
        self._fmt, self._samples, self._done, self._per_request = fmt, samples, done, per_request
        self._fresh: Iterator[Item] = self._unfinished(records)
        self._ahead: Optional[Item] = None
        self._again: deque[Item] = deque()
        self._fresh_left = True

    def _unfinished(self, records: Iterable[Record]) -> Iterator[Item]:
        for record in records:
            for item in self._fmt.items(record, self._samples):
                if not self._done[record.index * self._samples + item.sample]:
                    yield item

    def _is_done(self, item: Item) -> bool:
        return self._done[item.record.index * self._samples + item.sample]

    def take(self) -> list[Item]:
        """The next request's items: one item given back, else up to prompts_per_request fresh ones that
        may share a request; [] when there is nothing to take now."""
        while self._again:
            item = self._again.popleft()
            if not self._is_done(item):  # a straggler of a lost server may have finished it meanwhile
                return [item]
        group: list[Item] = []
        while len(group) < self._per_request:
            item = self._peek()
            if item is None or (group and not self._fmt.can_share(group[0], group[-1], item)):
                break
            group.append(item)
            self._ahead = None
        return group

    def _peek(self) -> Optional[Item]:
        if self._ahead is None and self._fresh_left:
            self._ahead = next(self._fresh, None)
            self._fresh_left = self._ahead is not None
        return self._ahead

    def give_back(self, items: list[Item], first: bool = False) -> None:
        """Items to send again, each in a request of its own (first: before the others given back)."""
        if first:
            self._again.extendleft(reversed(items))
        else:
            self._again.extend(items)

    @property
    def exhausted(self) -> bool:
        return self._peek() is None and not self._again
