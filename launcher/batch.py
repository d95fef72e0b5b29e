"""Prompt batches: JSONL records in, through the servers' PUT /generate, JSONL results out in input order."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from threading import Lock
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from pydantic import ValidationError
from tqdm import tqdm

from fleetgen.launcher.errors import LaunchError
from fleetgen.conf.schema import Generation

RECORD_KEYS = {"id", "prompt"} | set(Generation.model_fields)


@dataclass
class Record:
    line: int
    id: Any
    prompt: str
    params: dict  # NeMo's generation fields: the defaults with the record's own fields applied


@dataclass
class Summary:
    prompts: int
    failed: int
    generated_tokens: int
    seconds: float


def read_records(path: Path, defaults: Generation) -> list[Record]:
    """Parse and check every line up front, so a bad line fails before any job is submitted."""
    if not path.is_file():
        raise LaunchError(f"batch.input={path}: no such file")
    records = []
    for line_no, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise LaunchError(f"{path}, line {line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise LaunchError(f"{path}, line {line_no}: expected a JSON object with a \"prompt\", "
                              f"got {type(obj).__name__}")
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise LaunchError(f"{path}, line {line_no}: \"prompt\" must be a non-empty string")
        unknown = sorted(set(obj) - RECORD_KEYS)
        if unknown:
            raise LaunchError(f"{path}, line {line_no}: unknown field(s) {', '.join(unknown)}; a record has "
                              f"id, prompt and generation fields: {', '.join(sorted(Generation.model_fields))}")
        own = {k: v for k, v in obj.items() if k not in ("id", "prompt")}
        try:
            params = Generation.model_validate({**defaults.model_dump(), **own}).model_dump()
        except ValidationError as e:
            err = e.errors()[0]
            raise LaunchError(f"{path}, line {line_no}: field {'.'.join(map(str, err['loc']))}: "
                              f"{err['msg']} (got {err['input']!r})") from None
        records.append(Record(line_no, obj.get("id", line_no), obj["prompt"], params))
    if not records:
        raise LaunchError(f"batch.input={path}: no records")
    return records


def _requests(records: list[Record], per_request: int) -> Iterator[list[tuple[int, Record]]]:
    """Consecutive records with the same generation parameters share a request; each keeps its index."""
    chunk: list[tuple[int, Record]] = []
    for index, record in enumerate(records):
        if chunk and (len(chunk) == per_request or chunk[0][1].params != record.params):
            yield chunk
            chunk = []
        chunk.append((index, record))
    if chunk:
        yield chunk


class BatchRunner:
    def __init__(self, urls: list[str], count_prompt_tokens: Callable[[str, bool], int],
                 concurrency: int, prompts_per_request: int, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(None, connect=30))
        self._urls, self._url_lock = cycle(urls), Lock()
        self._count_prompt_tokens = count_prompt_tokens
        self._concurrency, self._per_request = concurrency, prompts_per_request

    def run(self, records: list[Record], output: Path) -> Summary:
        """Results go to OUTPUT.partial line by line; a rerun skips records already there; then renamed."""
        partial = output.with_name(output.name + ".partial")
        done = _keep_finished(partial)
        todo = [r for r in records if json.dumps(r.id) not in done]
        start, results, generated, failed = time.monotonic(), {}, 0, 0
        next_line = 0  # index into todo of the next record to write: results are written in input order
        with open(partial, "a") as out, ThreadPoolExecutor(self._concurrency) as pool, \
                tqdm(total=len(records), initial=len(records) - len(todo), unit="prompt", leave=False) as bar:
            for chunk_results in pool.map(self._send, _requests(todo, self._per_request)):
                for result in chunk_results:
                    results[result.pop("_index")] = result
                while next_line < len(todo) and next_line in results:
                    result = results.pop(next_line)
                    generated += result.get("completion_tokens", 0)
                    failed += "error" in result
                    out.write(json.dumps(result) + "\n")
                    out.flush()
                    next_line += 1
                    bar.update(1)
        os.replace(partial, output)
        return Summary(len(records), failed, generated, time.monotonic() - start)

    def _send(self, chunk: list[tuple[int, Record]]) -> list[dict]:
        body = {"sentences": [r.prompt for _, r in chunk], **chunk[0][1].params}
        with self._url_lock:
            url = next(self._urls)
        try:
            response = self._client.put(f"{url}/generate", json=body)
        except httpx.TransportError as e:
            raise LaunchError(f"lost the server at {url} ({e}); the job's log tells why") from None
        if response.status_code == 400 and len(chunk) > 1:  # one bad record must not fail its neighbours
            return [result for item in chunk for result in self._send([item])]
        if response.status_code != 200:
            return [self._result(i, r, error=_error_text(response)) for i, r in chunk]
        answer = response.json()
        return [self._result(i, r, sentence=answer["sentences"][k], token_ids=answer["token_ids"][k])
                for k, (i, r) in enumerate(chunk)]

    def _result(self, index: int, record: Record, sentence: str = "", token_ids: list[int] = (),
                error: str = "") -> dict:
        result = {"_index": index, "id": record.id, "prompt": record.prompt}
        if error:
            result["error"] = error
        else:
            prompt_tokens = self._count_prompt_tokens(record.prompt, record.params["add_BOS"])
            result.update(completion=sentence[len(record.prompt):] if sentence.startswith(record.prompt)
                          else sentence, prompt_tokens=prompt_tokens,
                          completion_tokens=len(token_ids) - prompt_tokens)
        result["params"] = record.params
        return result


def _error_text(response: httpx.Response) -> str:
    try:
        return f"HTTP {response.status_code}: {response.json()['error']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"


def _keep_finished(partial: Path) -> set[str]:
    """The ids already in an interrupted run's results; a line it cut short is dropped (and redone)."""
    if not partial.exists():
        return set()
    ids, kept = set(), []
    for text in partial.read_text().splitlines():
        try:
            ids.add(json.dumps(json.loads(text)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        kept.append(text + "\n")
    partial.write_text("".join(kept))
    return ids
