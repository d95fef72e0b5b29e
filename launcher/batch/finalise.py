"""The final output: the ledger's records written in input order (an index of ledger offsets, 9 bytes per
item, then one pass copying each record's bytes by offset), renamed into place, then audited by reading the
written files back."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fleetgen.launcher.batch.keys import DuplicateKeys, hash64
from fleetgen.launcher.batch.ledger import entries, record_bytes

CHUNK = 1 << 16


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


def finalise(ledger: Path, output: Path, errors: Path, items: int, samples: int) -> Audit:
    """Write OUTPUT and OUTPUT.errors.jsonl in input order; every item must be in the ledger."""
    offsets, ok = np.full(items, -1, dtype=np.int64), np.zeros(items, dtype=bool)
    repeats = 0
    for offset, head, _ in entries(ledger):
        position = head["i"] * samples + head["s"]
        if offsets[position] >= 0:
            repeats += 1
        else:
            offsets[position], ok[position] = offset, head["ok"]
    missing = int((offsets < 0).sum())
    if missing:
        raise RuntimeError(f"{ledger}: {missing} of {items} items have no entry; the run is not complete")
    with open(ledger, "rb") as source, _Atomic(output) as out, _Atomic(errors) as err:
        for start in range(0, items, CHUNK):  # as Python ints a chunk at a time: a list of all would be large
            for offset, good in zip(offsets[start:start + CHUNK].tolist(), ok[start:start + CHUNK].tolist()):
                source.seek(offset)
                (out if good else err).write(record_bytes(source.readline()) + b"\n")
    del offsets, ok
    return audit(output, errors, items, repeats)


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
