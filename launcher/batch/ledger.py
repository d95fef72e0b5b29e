"""The ledger beside the output: one JSON line per finished item, appended and flushed (a batch of lines at
once: the dispatcher flushes once per event-loop tick, and lines are written anyway once 256 kB wait), fsynced
every few seconds and on close. Its first line ties it to the input file and the generation settings.

A rerun replays it: finished items are skipped, a torn last line (a kill or a crash mid-write) is cut off
and its item redone. Entries: {"i": record index, "s": sample, "k": key, "ok": bool, "tokens": [p, c, r]
(prompt, completion, and prompt tokens the server reused from its KV cache; older ledgers have no r), "record":
the output or errors-file record}, "record" last, so that readers that need only the entry's head (replay, the
merge's index) and the merge itself (which copies the record's bytes) never parse the record.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from collections.abc import Iterator

import numpy as np

from fleetgen.launcher.errors import LaunchError

VERSION = 1
FSYNC_EVERY_S = 2.0
PENDING_MOST = 1 << 18  # bytes of lines held before they are written anyway (a loop tick of 8,192 answers is 18 MB)


def ledger_path(output: Path, shard: int = 0, shards: int = 1) -> Path:
    """OUTPUT's ledger, or with batch.shards > 1 the ledger of driver `shard`."""
    if shards == 1:
        return output.with_name(output.name + ".ledger.jsonl")
    return output.with_name(f"{output.name}.shard-{shard}-of-{shards}.ledger.jsonl")


def make_header(input_fingerprint: str, settings: dict, items: int) -> dict:
    return {"fleetgen_ledger": VERSION, "input": input_fingerprint, "settings": settings, "items": items}


def check_header(path: Path, header: dict, restart_hint: str) -> None:
    """Refuse a ledger written for another input or other settings: mixing them would be silent and wrong."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        first = f.readline()
    try:
        found = json.loads(first)
        version = found.get("fleetgen_ledger")
    except (json.JSONDecodeError, AttributeError):
        raise LaunchError(f"{path}: not a fleetgen ledger (its first line is not a ledger header); "
                          f"{restart_hint}") from None
    if version != VERSION:
        raise LaunchError(f"{path}: ledger version {version!r}, this fleetgen writes {VERSION}; {restart_hint}")
    if found["input"] != header["input"]:
        raise LaunchError(f"{path} was written for a different input: batch.input changed since that run "
                          f"started; {restart_hint}")
    changed = _changes(found["settings"], header["settings"])
    if changed:
        raise LaunchError(f"{path} was written with other settings ({', '.join(changed)}); {restart_hint}")


SETTING_KEYS = {"samples": "batch.samples", "seed": "batch.seed", "checkpoint": "model.checkpoint",
                "format": "the input's format"}  # the config keys that set a ledger header's settings


def _changes(then: dict, now: dict, prefix: str = "") -> list[str]:
    """Each changed setting as `key: old → new`, by its config key (generation.tokens_to_generate: 32 → 8)."""
    changes = []
    for key in sorted(set(then) | set(now)):
        old, new = then.get(key), now.get(key)
        name = f"{prefix}{key}" if prefix else SETTING_KEYS.get(key, key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _changes(old, new, f"{name}.")
        elif old != new:
            changes.append(f"{name}: {json.dumps(old)} → {json.dumps(new)}")
    return changes


RECORD = b', "record": '


def entries(path: Path) -> Iterator[tuple[int, dict, bytes]]:
    """(byte offset, head, whole line) of every entry, the head being the entry without its record."""
    with open(path, "rb") as f:
        f.readline()
        offset = f.tell()
        for raw in f:
            head = _head(raw)
            if head is None:
                return
            yield offset, head, raw
            offset += len(raw)


def record_bytes(raw: bytes) -> bytes:
    return raw[raw.index(RECORD) + len(RECORD):-2]


def _head(raw: bytes) -> dict | None:
    """The entry's head, or None for a line that is not a whole entry (torn, zero-filled, foreign)."""
    cut = raw.find(RECORD)
    if cut < 0 or not raw.endswith(b"}\n"):
        return None
    try:
        head = json.loads(raw[:cut] + b"}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return head if isinstance(head, dict) and {"i", "s", "ok", "tokens"} <= set(head) else None


def _whole(raw: bytes) -> bool:
    try:
        return _head(raw) is not None and isinstance(json.loads(raw), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def repair(path: Path) -> int:
    """Cut a torn tail off (returns the bytes cut); refuse a ledger damaged anywhere else. Every line's head
    is checked, and the last line whole (a crash can only tear what was written last)."""
    with open(path, "rb") as f:
        f.readline()
        good_end, bad_line, number, last = f.tell(), None, 1, b""
        for raw in f:
            number += 1
            if _head(raw) is None:
                bad_line = bad_line or number
            elif bad_line is not None:
                raise LaunchError(f"{path}, line {bad_line}: damaged entry before whole ones (not a torn last "
                                  "line); move the ledger away or use batch.restart=true")
            else:
                good_end, last = f.tell(), raw
        size = f.tell()
    if last and not _whole(last):
        good_end -= len(last)
    if size > good_end:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return size - good_end


class Bits:
    """One bit per item: which are finished (a million items take 125 kB)."""

    def __init__(self, size: int):
        self._bytes = np.zeros((size + 7) // 8, dtype=np.uint8)

    def __getitem__(self, position: int) -> bool:
        return bool(self._bytes[position >> 3] & (1 << (position & 7)))

    def set(self, position: int) -> None:
        self._bytes[position >> 3] |= 1 << (position & 7)

    def positions(self) -> list[int]:
        return np.flatnonzero(np.unpackbits(self._bytes, bitorder="little")).tolist()


class Ledger:
    """Append-only, one writer (calls are serialised by a lock: the progress thread syncs); `done` marks
    finished items by position."""

    def __init__(self, path: Path, header: dict, samples: int):
        self.path, self.samples = path, samples
        self.done = Bits(header["items"])
        self.finished = self.failed = self.prompt_tokens = self.completion_tokens = self.reused_tokens = 0
        self.cut_bytes = 0
        if not path.exists():
            _create(path, header)
        else:
            self.cut_bytes = repair(path)
            for _, head, _ in entries(path):
                self._count(head)
        self._file = open(path, "ab")
        self._lock, self._synced, self._closed = threading.Lock(), time.monotonic(), False
        self._pending: list[bytes] = []  # lines added, not yet written
        self._pending_bytes = 0

    def _count(self, entry: dict) -> bool:
        position = entry["i"] * self.samples + entry["s"]
        if self.done[position]:
            return False
        self.done.set(position)
        self.finished += 1
        self.failed += not entry["ok"]
        self.prompt_tokens += entry["tokens"][0]
        self.completion_tokens += entry["tokens"][1]
        self.reused_tokens += entry["tokens"][2] if len(entry["tokens"]) > 2 else 0
        return True

    def add(self, index: int, sample: int, key, ok: bool, record: dict, tokens: tuple[int, ...] = (0, 0, 0)) -> bool:
        """Record a finished item once: False if it was already recorded (or the ledger is closed). Counted at
        once; its line is written, in the order of the calls, by the next flush() (or sync(), close())."""
        entry = {"i": index, "s": sample, "k": key, "ok": ok, "tokens": list(tokens)}
        line = (json.dumps(entry)[:-1] + RECORD.decode() + json.dumps(record) + "}\n").encode()
        with self._lock:
            if self._closed or self.done[index * self.samples + sample]:
                return False
            self._pending.append(line)
            self._pending_bytes += len(line)
            self._count(entry)
            if self._pending_bytes > PENDING_MOST:
                self._write()
        return True

    def flush(self) -> None:
        """Write the lines added since the last flush in one write, and fsync if the last was FSYNC_EVERY_S ago."""
        with self._lock:
            if not self._closed:
                self._write()
                if time.monotonic() - self._synced > FSYNC_EVERY_S:
                    self._sync()

    def _write(self) -> None:
        if self._pending:
            self._file.write(b"".join(self._pending))
            self._file.flush()
            self._pending.clear()
            self._pending_bytes = 0

    def sync(self) -> None:
        with self._lock:
            if not self._closed:
                self._write()
                self._sync()

    def _sync(self) -> None:
        self._file.flush()  # fsync reaches only what Python's buffer has handed to the OS
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        """Flush and fsync; later add() calls (a straggling request) are ignored."""
        with self._lock:
            if not self._closed:
                self._write()
                self._sync()
                self._file.close()
                self._closed = True


def _create(path: Path, header: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
