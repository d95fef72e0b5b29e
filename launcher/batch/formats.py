"""The two input formats: fleetgen's JSONL (NeMo's /generate fields) and OpenAI's batch file for completions.

Each format checks its lines, turns work items into request bodies, and turns answers into the records that
the output and the errors file hold (fleetgen's shape, or OpenAI's batch output objects).
"""
from __future__ import annotations

import uuid
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import ValidationError

from fleetgen.conf.schema import Generation
from fleetgen.launcher.batch.keys import base_seed
from fleetgen.launcher.errors import LaunchError

OPENAI_KEYS = {"custom_id", "method", "url", "body"}
OPENAI_URL = "/v1/completions"


@dataclass(slots=True)
class Record:
    index: int                       # position among the input's records, from 0
    line: int                        # line number in the input file, from 1
    key: Any                         # its id / custom_id, or its line number
    prompt: Optional[str] = None     # fleetgen
    params: Optional[dict] = None    # fleetgen: the generation defaults with the record's own fields applied
    body: Optional[dict] = None      # openai: the /v1/completions request


@dataclass(slots=True)
class Item:
    """A unit of work: sample `sample` of a record, seeded with `seed` (None: greedy)."""
    record: Record
    sample: int
    seed: Optional[int]
    attempts: int = 0

    @property
    def position(self) -> tuple[int, int]:
        return self.record.index, self.sample


class FleetgenFormat:
    name, method, route = "fleetgen", "PUT", "/generate"

    def __init__(self, defaults: Generation, batch_seed: int):
        self._defaults, self._batch_seed = defaults.model_dump(), batch_seed
        self._fields = set(Generation.model_fields)

    def parse(self, obj: Any, index: int, line: int, where: str) -> tuple[Record, bool]:
        """The record and whether it gave an id; raises LaunchError naming the line and the field."""
        if not isinstance(obj, dict):
            raise LaunchError(f"{where}: expected a JSON object with a \"prompt\", got {type(obj).__name__}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise LaunchError(f"{where}: \"prompt\" must be a non-empty string")
        own = {k: v for k, v in obj.items() if k not in ("id", "prompt")}
        unknown = sorted(set(own) - self._fields)
        if unknown:
            raise LaunchError(f"{where}: unknown field(s) {', '.join(unknown)}; a record has id, prompt and "
                              f"generation fields: {', '.join(sorted(self._fields))}")
        has_id = "id" in obj
        if has_id and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int))):
            raise LaunchError(f"{where}: \"id\" must be a string or an integer, got {obj['id']!r}")
        params = self._defaults
        if own:  # most records take the defaults: no per-record validation for them
            try:
                params = Generation.model_validate({**self._defaults, **own}).model_dump()
            except ValidationError as e:
                err = e.errors()[0]
                raise LaunchError(f"{where}: field {'.'.join(map(str, err['loc']))}: {err['msg']} "
                                  f"(got {err['input']!r})") from None
        return Record(index, line, obj["id"] if has_id else line, prompt=prompt, params=params), has_id

    def items(self, record: Record, samples: int) -> list[Item]:
        params = record.params
        if params["greedy"]:
            return [Item(record, j, None) for j in range(samples)]
        base = params["random_seed"] if params["random_seed"] is not None else base_seed(self._batch_seed, record.key)
        return [Item(record, j, base + j) for j in range(samples)]

    @staticmethod
    def can_share(first: Item, last: Item, item: Item) -> bool:
        """The server seeds sentence i with random_seed + i: sampled items share a request only as a run of
        consecutive samples of one record, so every sentence's seed is exactly its own."""
        a, b = first.record.params, item.record.params
        if a is not b and a != b:
            return False
        return first.seed is None or (item.record is last.record and item.sample == last.sample + 1)

    @staticmethod
    def body(items: list[Item], model: str) -> dict:
        first = items[0]  # the items' settings are equal (can_share); sentence i is seeded with its seed + i
        seed = first.seed if first.seed is not None else first.record.params["random_seed"]
        return {"sentences": [item.record.prompt for item in items], **first.record.params, "random_seed": seed}

    @staticmethod
    def tokens_requested(items: list[Item]) -> int:
        return sum(item.record.params["tokens_to_generate"] for item in items)

    @staticmethod
    def results(items: list[Item], answer: dict) -> list[tuple[dict, int, int]]:
        """(output record, prompt tokens, completion tokens) per item."""
        out = []
        for k, item in enumerate(items):
            record, sentence, offsets = item.record, answer["sentences"][k], answer["offsets"][k]
            prompt_tokens = bisect_left(offsets, len(record.prompt))  # the prompt's tokens end where its text does
            completion_tokens = len(answer["token_ids"][k]) - prompt_tokens
            completion = sentence[len(record.prompt):] if sentence.startswith(record.prompt) else sentence
            result = {"id": record.key, "sample": item.sample, "seed": item.seed, "prompt": record.prompt,
                      "completion": completion, "prompt_tokens": prompt_tokens,
                      "completion_tokens": completion_tokens, "params": record.params}
            if record.params["compute_logprob"] and answer.get("logprob"):
                result["logprob"] = answer["logprob"][k]
            out.append((result, prompt_tokens, completion_tokens))
        return out

    @staticmethod
    def error(item: Item, message: str, status: Optional[int], body: Any) -> dict:
        return {"id": item.record.key, "sample": item.sample, "seed": item.seed, "line": item.record.line,
                "status_code": status, "error": message}


class OpenAIFormat:
    """OpenAI's batch file: {"custom_id", "method": "POST", "url": "/v1/completions", "body"} per line; out,
    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}. The body is checked by
    the server, so a bad body lands in the errors file as OpenAI's would."""
    name, method, route = "openai", "POST", OPENAI_URL

    def __init__(self, batch_seed: int):
        self._batch_seed = batch_seed

    @staticmethod
    def parse(obj: Any, index: int, line: int, where: str) -> tuple[Record, bool]:
        if not isinstance(obj, dict):
            raise LaunchError(f"{where}: expected a JSON object (OpenAI batch format), got {type(obj).__name__}")
        missing, unknown = sorted(OPENAI_KEYS - set(obj)), sorted(set(obj) - OPENAI_KEYS)
        if missing or unknown:
            raise LaunchError(f"{where}: an OpenAI batch request has exactly custom_id, method, url and body"
                              + (f"; missing {', '.join(missing)}" if missing else "")
                              + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        if not isinstance(obj["custom_id"], str) or not obj["custom_id"]:
            raise LaunchError(f"{where}: \"custom_id\" must be a non-empty string")
        if obj["method"] != "POST":
            raise LaunchError(f"{where}: \"method\" must be \"POST\", got {obj['method']!r}")
        if obj["url"] != OPENAI_URL:
            raise LaunchError(f"{where}: url {obj['url']!r} is not supported; fleetgen serves {OPENAI_URL} "
                              "(chat and embeddings are not served)")
        if not isinstance(obj["body"], dict):
            raise LaunchError(f"{where}: \"body\" must be a JSON object (a /v1/completions request)")
        return Record(index, line, obj["custom_id"], body=obj["body"]), True

    def items(self, record: Record, samples: int) -> list[Item]:
        body = record.body
        seed = body.get("seed")
        if seed is None and body.get("temperature") != 0:  # OpenAI's default temperature, 1, samples
            seed = base_seed(self._batch_seed, record.key)
        return [Item(record, 0, seed)]

    @staticmethod
    def can_share(first: Item, last: Item, item: Item) -> bool:
        return False  # one OpenAI request per HTTP request, as the format describes

    @staticmethod
    def body(items: list[Item], model: str) -> dict:
        """The served model answers whatever model the file names (files move between tools)."""
        [item] = items
        seed = {"seed": item.seed} if item.seed is not None else {}
        return {**item.record.body, **seed, "model": model}

    @staticmethod
    def tokens_requested(items: list[Item]) -> int:
        [item] = items
        body = item.record.body
        max_tokens = body.get("max_tokens", 16)
        prompts = body.get("prompt")
        count = max(len(prompts), 1) if isinstance(prompts, list) else 1  # an empty list is still asked once
        return (max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 16) * count

    @staticmethod
    def results(items: list[Item], answer: dict) -> list[tuple[dict, int, int]]:
        [item] = items
        usage = answer.get("usage") or {}
        record = {"id": _batch_request_id(), "custom_id": item.record.key,
                  "response": {"status_code": 200, "request_id": answer.get("id", _batch_request_id()),
                               "body": answer},
                  "error": None}
        return [(record, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))]

    @staticmethod
    def error(item: Item, message: str, status: Optional[int], body: Any) -> dict:
        """An HTTP answer goes in `response` (as OpenAI's error file has it); a failure without one, in `error`."""
        if status is None:
            return {"id": _batch_request_id(), "custom_id": item.record.key, "response": None,
                    "error": {"code": "server_unavailable", "message": message}}
        return {"id": _batch_request_id(), "custom_id": item.record.key,
                "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
                "error": None}


def _batch_request_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"
