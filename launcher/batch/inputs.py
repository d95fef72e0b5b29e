"""The input file as a stream: one validation pass that keeps no records, then records read on demand."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Optional

from fleetgen.launcher.batch.formats import FleetgenFormat, OpenAIFormat, Record
from fleetgen.launcher.batch.keys import DuplicateKeys
from fleetgen.launcher.batch.prompts import LongPrompts
from fleetgen.launcher.errors import LaunchError

Format = FleetgenFormat | OpenAIFormat


@dataclass
class Scan:
    records: int
    keyed_by_id: bool
    fingerprint: str   # of the file's bytes


def detect_format(path: Path) -> str:
    """The input's format: OpenAI's batch format when the first record has a custom_id, else fleetgen's."""
    for _, text in _lines(path):
        try:
            first = json.loads(text)
        except json.JSONDecodeError:
            return "fleetgen"  # the validation pass names the line
        return "openai" if isinstance(first, dict) and "custom_id" in first else "fleetgen"
    raise LaunchError(f"batch.input={path}: no records")


def scan(path: Path, fmt: Format, long_prompts: Optional[LongPrompts] = None) -> Scan:
    """Check every line (JSON, the format's fields, the id rules) and fingerprint the bytes; keeps no record.
    long_prompts (batch.long_prompts=error): prompts too long for the context window are counted there, and
    refused together at the end."""
    digest, duplicates = hashlib.blake2b(digest_size=16), DuplicateKeys()
    first_with_id = first_without_id = None
    count = 0
    for line, text in _lines(path, digest):
        record, has_id = fmt.parse(_json(text, path, line), count, line, f"{path}, line {line}")
        if long_prompts is not None and record.fit is not None and record.fit.too_long:
            long_prompts.add(line, record.fit)
        if has_id:
            first_with_id = first_with_id or line
            duplicates.add(record.key)
        else:
            first_without_id = first_without_id or line
        if first_with_id and first_without_id:
            raise LaunchError(f"{path}: line {first_with_id} has an \"id\" but line {first_without_id} has none: "
                              "give every record an id, or none (then line numbers are the keys)")
        count += 1
    if not count:
        raise LaunchError(f"batch.input={path}: no records")
    if long_prompts is not None:
        long_prompts.check(path)
    if first_with_id:
        _refuse_repeated_keys(path, fmt, duplicates)
    return Scan(count, bool(first_with_id), digest.hexdigest())


def _refuse_repeated_keys(path: Path, fmt: Format, duplicates: DuplicateKeys) -> None:
    suspects = duplicates.suspects()
    if not suspects:
        return
    repeat = DuplicateKeys.first_repeat(suspects, ((r.key, r.line) for r in records(path, fmt)))
    if repeat:
        key, first, again = repeat
        name = "custom_id" if isinstance(fmt, OpenAIFormat) else "id"
        raise LaunchError(f"{path}: {name} {key!r} on line {again} repeats line {first}: every record needs "
                          f"its own {name}")


def shard_of(index: int, shards: int) -> int:
    """The driver (batch.shards) of the record at this index: every shards-th record, so shards stay even
    however records are spread over the file."""
    return index % shards


def records(path: Path, fmt: Format, shard: int = 0, shards: int = 1) -> Iterator[Record]:
    """The records in input order (those of one shard: index % shards == shard); the file was checked by
    scan(). Another shard's lines are not parsed."""
    for index, (line, text) in enumerate(_lines(path)):
        if shard_of(index, shards) == shard:
            yield fmt.parse(_json(text, path, line), index, line, f"{path}, line {line}")[0]


def _lines(path: Path, digest=None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; every byte goes through digest."""
    if not path.is_file():
        raise LaunchError(f"batch.input={path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if digest is not None:
                digest.update(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LaunchError(f"{path}, line {number}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if text.strip():
                yield number, text


def _json(text: str, path: Path, line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LaunchError(f"{path}, line {line}: not valid JSON ({e.msg} at column {e.colno})") from None
