"""Keys of records, seeds of samples, and the fingerprints that tie a ledger to its input and settings."""
from __future__ import annotations

import hashlib
import json
import tempfile
from array import array
from pathlib import Path
from typing import Any, Optional
from collections.abc import Iterable

import numpy as np

SEED_BITS = 62  # the server accepts seeds up to 2**63 - 129 and adds the sentence's index to a request's seed
BUCKET_BITS = 6
BUCKETS = 1 << BUCKET_BITS
BUFFERED = 8192  # hashes held per bucket before they go to its file


def key_text(key: Any) -> str:
    """A key as the ledger and messages write it: 1 and "1" stay distinct."""
    return json.dumps(key)


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def base_seed(batch_seed: int, key: Any) -> int:
    """Sample j of a record is seeded with base_seed + j: a pure function of (batch.seed, key, j)."""
    return hash64(f"{batch_seed}:{key_text(key)}") >> (64 - SEED_BITS)


class DuplicateKeys:
    """Finds keys that repeat in flat memory: each key's 8-byte hash goes to one of BUCKETS files by its top
    bits (at most BUFFERED hashes a bucket, 4 MiB in all, are held before they go), then each bucket is sorted
    alone; the few suspects' real keys are compared by first_repeat()."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="fleetgen-keys-")
        self._buffers = [array("Q") for _ in range(BUCKETS)]

    def add(self, key: Any) -> None:
        digest = hash64(key_text(key))
        bucket = digest >> (64 - BUCKET_BITS)
        self._buffers[bucket].append(digest)
        if len(self._buffers[bucket]) >= BUFFERED:
            self._flush(bucket)

    def _flush(self, bucket: int) -> None:
        with open(Path(self._folder.name) / str(bucket), "ab") as f:
            self._buffers[bucket].tofile(f)
        self._buffers[bucket] = array("Q")

    def suspects(self) -> set[int]:
        repeated: set[int] = set()
        for bucket in range(BUCKETS):
            self._flush(bucket)
            hashes = np.fromfile(Path(self._folder.name) / str(bucket), dtype=np.uint64)
            hashes.sort()
            repeated.update(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
        self._folder.cleanup()
        return repeated

    @staticmethod
    def first_repeat(suspects: set[int], keyed_lines: Iterable[tuple[Any, int]]) -> Optional[tuple[Any, int, int]]:
        """(key, first line, repeating line) of the first key seen twice, checked on the real keys."""
        seen: dict[str, int] = {}
        for key, line in keyed_lines:
            text = key_text(key)
            if hash64(text) in suspects:
                if text in seen:
                    return key, seen[text], line
                seen[text] = line
        return None
