"""The final output: the ledger's records written in input order (an index of ledger offsets, 8 bytes per
item, then one pass reading entries by offset), renamed into place, then audited from the files themselves."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fleetgen.launcher.batch.keys import DuplicateKeys, hash64
from fleetgen.launcher.batch.ledger import entries


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
    offsets = np.full(items, -1, dtype=np.int64)
    repeats = 0
    for offset, entry in entries(ledger):
        position = entry["i"] * samples + entry["s"]
        if offsets[position] >= 0:
            repeats += 1
        else:
            offsets[position] = offset
    missing = int((offsets < 0).sum())
    if missing:
        raise RuntimeError(f"{ledger}: {missing} of {items} items have no entry; the run is not complete")
    with open(ledger, "rb") as source, _Atomic(output) as out, _Atomic(errors) as err:
        for offset in offsets.tolist():
            source.seek(offset)
            entry = json.loads(source.readline())
            (out if entry["ok"] else err).write(json.dumps(entry["record"]) + "\n")
    del offsets
    return audit(output, errors, items, repeats)


def audit(output: Path, errors: Path, items: int, ledger_repeats: int = 0) -> Audit:
    """Input items = output records + error records, and no (key, sample) twice, read back from the files."""
    keys, counts = DuplicateKeys(), []
    for path in (output, errors):
        count = 0
        with open(path) as f:
            for text in f:
                keys.add(_key_of(json.loads(text)))
                count += 1
        counts.append(count)
    suspects = keys.suspects()
    repeated = 0
    if suspects:
        seen = set()
        for path in (output, errors):
            with open(path) as f:
                for text in f:
                    key = json.dumps(_key_of(json.loads(text)))
                    if hash64(key) in suspects:  # only the few suspects are held
                        repeated += key in seen
                        seen.add(key)
    ok = counts[0] + counts[1] == items and not repeated
    return Audit(items, counts[0], counts[1], repeated, ledger_repeats, ok)


def _key_of(record: dict):
    return record["custom_id"] if "custom_id" in record else [record["id"], record["sample"]]


class _Atomic:
    """A file written beside its destination, fsynced and renamed into place only if no error interrupted it."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self):
        self.file = open(self.tmp, "w")
        return self.file

    def __exit__(self, kind, value, traceback):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
