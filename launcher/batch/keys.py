"""Keys of records, seeds of samples, and the fingerprints that tie a ledger to its input and settings."""
from __future__ import annotations

import hashlib
import json
from array import array
from typing import Any, Iterable

import numpy as np

SEED_BITS = 62  # the server accepts seeds up to 2**63 - 129 and adds the sentence's index to a request's seed


def key_text(key: Any) -> str:
    """A key as the ledger and messages write it: 1 and "1" stay distinct."""
    return json.dumps(key)


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def base_seed(batch_seed: int, key: Any) -> int:
    """Sample j of a record is seeded with base_seed + j: a pure function of (batch.seed, key, j)."""
    return hash64(f"{batch_seed}:{key_text(key)}") >> (64 - SEED_BITS)


class DuplicateKeys:
    """Finds keys that repeat in bounded memory: 8 bytes of hash per key, then the few suspects' lines."""

    def __init__(self):
        self._hashes = array("Q")

    def add(self, key: Any) -> None:
        self._hashes.append(hash64(key_text(key)))

    def suspects(self) -> set[int]:
        if not self._hashes:
            return set()
        hashes = np.frombuffer(self._hashes, dtype=np.uint64)  # sorted in place: no second copy
        hashes.sort()
        repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
        del hashes
        self._hashes = array("Q")
        return repeated

    @staticmethod
    def first_repeat(suspects: set[int], keyed_lines: Iterable[tuple[Any, int]]) -> tuple[Any, int, int] | None:
        """(key, first line, repeating line) of the first key seen twice, checked on the real keys."""
        seen: dict[str, int] = {}
        for key, line in keyed_lines:
            text = key_text(key)
            if hash64(text) in suspects:
                if text in seen:
                    return key, seen[text], line
                seen[text] = line
        return None


def settings_fingerprint(settings: dict) -> str:
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()
