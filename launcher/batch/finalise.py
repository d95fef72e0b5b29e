"""The final output: the ledger's records written in input order, renamed into place, then audited by
reading the written files back. The order comes from an external bucket sort of (position, ledger offset)
pairs, so memory stays flat however many items there are; records are copied as bytes, never parsed."""
from __future__ import annotations

import json
import os
import tempfile
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fleetgen.launcher.batch.keys import DuplicateKeys, hash64
from fleetgen.launcher.batch.ledger import entries, record_bytes

SPAN = 1 << 18     # positions per bucket: 4 MB of pairs to sort at a time
BUFFERED = 8192    # pairs held per bucket before they go to its file


@dataclass
class Audit:
    input_items: int
    output_records: int
    error_records: int
    repeated_keys: int      # (key, sample) pairs found twice across the output and errors files
    ledger_repeats: int     # entries the ledger holds twice (the first is kept)
    ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


def finalise(ledgers: list[Path], output: Path, errors: Path, items: int, samples: int) -> Audit:
    """Write OUTPUT and OUTPUT.errors.jsonl in input order from the ledgers (one, or one a shard); every item
    must be in one of them."""
    with tempfile.TemporaryDirectory(prefix="fleetgen-merge-", dir=output.parent) as folder:
        buckets, repeats = _index(ledgers, Path(folder), samples), 0
        sources = [open(ledger, "rb") for ledger in ledgers]
        try:
            with _Atomic(output) as out, _Atomic(errors) as err:
                for first in range(0, items, SPAN):
                    positions, places = buckets.load(first // SPAN)
                    repeats += len(positions) - len(places)
                    expected = min(SPAN, items - first)
                    if len(places) != expected:
                        raise RuntimeError(f"{', '.join(map(str, ledgers))}: {expected - len(places)} of {items} "
                                           "items have no entry; the run is not complete")
                    for start in range(0, len(places), BUFFERED):  # Python ints a slice at a time: they are big
                        for place in places[start:start + BUFFERED].tolist():
                            ledger, offset = divmod(abs(place), _OFFSETS)
                            sources[ledger].seek(offset)
                            (out if place > 0 else err).write(record_bytes(sources[ledger].readline()) + b"\n")
        finally:
            for source in sources:
                source.close()
    return audit(output, errors, items, repeats)


_OFFSETS = 1 << 50  # an entry's place: its ledger × this + its byte offset there (offsets start past the header)


def _index(ledgers: list[Path], folder: Path, samples: int) -> _Buckets:
    """(position, place) of every entry, bucketed by position range; an error's place is negated."""
    buckets = _Buckets(folder)
    for number, ledger in enumerate(ledgers):
        for offset, head, _ in entries(ledger):
            place = number * _OFFSETS + offset
            buckets.add(head["i"] * samples + head["s"], place if head["ok"] else -place)
    return buckets


class _Buckets:
    """Pairs spilled to one file per SPAN positions, so that sorting one bucket bounds the merge's memory."""

    def __init__(self, folder: Path):
        self._folder, self._buffers = folder, {}

    def add(self, position: int, offset: int) -> None:
        buffer = self._buffers.setdefault(position // SPAN, array("q"))
        buffer.extend((position, offset))
        if len(buffer) >= 2 * BUFFERED:
            self._flush(position // SPAN)

    def _flush(self, bucket: int) -> None:
        with open(self._folder / str(bucket), "ab") as f:
            self._buffers.pop(bucket, array("q")).tofile(f)

    def load(self, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """The bucket's positions as found, and the offsets of the first entry of each position, in order."""
        self._flush(bucket)
        pairs = np.fromfile(self._folder / str(bucket), dtype=np.int64).reshape(-1, 2)
        pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]  # stable: the first entry of a position wins
        first = np.ones(len(pairs), dtype=bool)
        first[1:] = pairs[1:, 0] != pairs[:-1, 0]
        return pairs[:, 0], pairs[first, 1]


def audit(output: Path, errors: Path, items: int, ledger_repeats: int = 0) -> Audit:
    """Input items = output records + error records, and no (key, sample) twice, read back from the files."""
    keys, counts = DuplicateKeys(), []
    for path in (output, errors):
        count = 0
        with open(path) as f:
            for text in f:
                keys.add(key_of(text))
                count += 1
        counts.append(count)
    suspects = keys.suspects()
    repeated = 0
    if suspects:
        seen = set()
        for path in (output, errors):
            with open(path) as f:
                for text in f:
                    key = json.dumps(key_of(text))
                    if hash64(key) in suspects:  # only the few suspects are held
                        repeated += key in seen
                        seen.add(key)
    ok = counts[0] + counts[1] == items and not repeated
    return Audit(items, counts[0], counts[1], repeated, ledger_repeats, ok)


_DECODER = json.JSONDecoder()


def key_of(line: str):
    """A written record's (key, sample), or its custom_id, decoded from the start of its line: both formats
    write those first, so the rest of the record (the text) is not parsed."""
    if line.startswith('{"id": '):
        first, end = _DECODER.raw_decode(line, len('{"id": '))
        if line.startswith(', "sample": ', end):
            return [first, _DECODER.raw_decode(line, end + len(', "sample": '))[0]]
        if line.startswith(', "custom_id": ', end):
            return _DECODER.raw_decode(line, end + len(', "custom_id": '))[0]
    record = json.loads(line)
    return record["custom_id"] if "custom_id" in record else [record["id"], record["sample"]]


class _Atomic:
    """A file written beside its destination, fsynced and renamed into place only if no error interrupted it."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self):
        self.file = open(self.tmp, "wb")
        return self.file

    def __exit__(self, kind, value, traceback):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
