"""The two input formats: fleetgen's JSONL (NeMo's /generate fields) and OpenAI's batch file (completions and
chat completions).

Each format checks its lines, turns work items into request bodies, and turns answers into the records that
the output and the errors file hold (fleetgen's shape, or OpenAI's batch output objects). With the model's
prompt rules (prompts.py: the validation pass before submission, and the run) a record's prompt is measured
against the context window and chat messages are rendered; without them (a driver test's stand-in servers)
prompts go as they are.
"""
from __future__ import annotations

import json
import uuid
from bisect import bisect_left
from difflib import get_close_matches
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from pydantic import ValidationError

from fleetgen.conf.schema import Generation
from fleetgen.launcher.batch.keys import base_seed
from fleetgen.launcher.batch.prompts import Fit, PromptRules
from fleetgen.launcher.errors import LaunchError

OPENAI_KEYS = {"custom_id", "method", "url", "body"}
OPENAI_URLS = ("/v1/completions", "/v1/chat/completions")
MISSPELT = 0.85  # a carried field this similar to a generation field's name is taken for a typo of it
# what fleetgen writes in an output or errors line: a record's own field of one of these names would be lost
OUTPUT_FIELDS = frozenset({"id", "sample", "seed", "prompt", "messages", "completion", "prompt_tokens",
                           "completion_tokens", "params", "logprob", "line", "status_code", "error"})


@dataclass(slots=True)
class Record:
    index: int                       # position among the input's records, from 0
    line: int                        # line number in the input file, from 1
    key: Any                         # its id / custom_id, or its line number
    prompt: Optional[str] = None     # fleetgen: the prompt text (chat messages rendered by the template)
    params: Optional[dict] = None    # fleetgen: the generation defaults with the record's own fields applied
    messages: Optional[list] = None  # fleetgen: the chat messages the prompt was rendered from
    carried: Optional[dict] = None   # fleetgen: the record's other fields, copied into its output line
    body: Optional[dict] = None      # openai: the request's body
    url: str = OPENAI_URLS[0]        # openai: the request's route
    fit: Optional[Fit] = None        # the prompt against the context window (with prompt rules)
    sent_prompt: Optional[str] = None  # fleetgen, a prompt cut from the left: the text the server keeps

    @property
    def refusal(self) -> Optional[str]:
        """batch.long_prompts=skip: why this record goes to the errors file without a request."""
        return self.fit.refusal if self.fit is not None else None

    @property
    def keep(self) -> Optional[int]:
        """batch.long_prompts=truncate_left: the prompt tokens the server keeps (its last ones)."""
        return self.fit.keep if self.fit is not None else None


class Tokens(NamedTuple):
    """An answer's token counts: its prompt's, those generated, and the prompt's leading ones the server found in
    its KV cache (reused, not computed: model.prefix_caching)."""
    prompt: int
    completion: int
    reused: int = 0


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
    name, method = "fleetgen", "PUT"

    def __init__(self, defaults: Generation, batch_seed: int, rules: Optional[PromptRules] = None):
        self._defaults, self._batch_seed, self._rules = defaults.model_dump(), batch_seed, rules
        self._fields = set(Generation.model_fields)

    @staticmethod
    def route(items: list[Item]) -> str:
        return "/generate"

    def parse(self, obj: Any, index: int, line: int, where: str) -> tuple[Record, bool]:
        """The record and whether it gave an id; raises LaunchError naming the line and the field. Fields
        that are neither its id, prompt or messages, nor generation fields, are carried to its output line."""
        if not isinstance(obj, dict):
            raise LaunchError(f"{where}: expected a JSON object with a \"prompt\", got {type(obj).__name__}")
        if ("prompt" in obj) == ("messages" in obj):
            raise LaunchError(f"{where}: a record has a \"prompt\" (text) or \"messages\" (a chat), one of them")
        prompt, messages = obj.get("prompt"), obj.get("messages")
        if messages is None and (not isinstance(prompt, str) or not prompt):
            raise LaunchError(f"{where}: \"prompt\" must be a non-empty string")
        own = {k: v for k, v in obj.items() if k in self._fields}
        carried = {k: v for k, v in obj.items() if k not in self._fields and k not in ("id", "prompt", "messages")}
        misspelt = {k: close[0] for k in carried if (close := get_close_matches(k, self._fields, 1, MISSPELT))}
        if misspelt:
            raise LaunchError(f"{where}: " + "; ".join(f"field {k!r}: did you mean {v!r}? (a generation field; "
                                                       "other fields are copied to the output line, but not one this "
                                                       "close to a generation field's name)"
                                                       for k, v in misspelt.items()))
        colliding = sorted(set(carried) & OUTPUT_FIELDS)
        if colliding:
            raise LaunchError(f"{where}: field(s) {', '.join(colliding)} would collide with the output line's own "
                              f"field(s) of that name; rename them (a record's other fields are copied to its "
                              f"output line)")
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
        record = Record(index, line, obj["id"] if has_id else line, prompt=prompt, params=params,
                        carried=carried or None)
        if messages is not None:
            if self._rules is None:
                raise LaunchError(f"{where}: \"messages\" need the model's chat template, which this run has "
                                  "not loaded")
            record.messages, record.prompt = messages, self._rules.render(messages, where)
            record.params = {**params, "end_strings": params["end_strings"] + list(self._rules.stops)}
        if self._rules is not None and self._rules.measure:
            record.fit = self._rules.fit(record.prompt, params["tokens_to_generate"], extra=int(params["add_BOS"]))
            if record.keep is not None:
                ids = self._rules.tokenizer.encode(record.prompt)
                record.sent_prompt = self._rules.tokenizer.decode(ids[len(ids) - record.keep:])
        return record, has_id

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
        if (a is not b and a != b) or first.record.keep is not None or item.record.keep is not None:
            return False  # a cut prompt is a request of its own: the server cuts every sentence of a request
        return first.seed is None or (item.record is last.record and item.sample == last.sample + 1)

    @staticmethod
    def prefix_text(item: Item) -> str:
        """What the server's KV cache holds of the item's prompt, as text ("" for a prompt cut from the left:
        its prefix is not the record's)."""
        return item.record.prompt if item.record.keep is None else ""

    @staticmethod
    def body(items: list[Item], model: str) -> dict:
        first = items[0]  # the items' settings are equal (can_share); sentence i is seeded with its seed + i
        seed = first.seed if first.seed is not None else first.record.params["random_seed"]
        cut = {} if first.record.keep is None else {"truncate_prompt_tokens": first.record.keep}
        return {"sentences": [item.record.prompt for item in items], **first.record.params, "random_seed": seed, **cut}

    @staticmethod
    def tokens_requested(items: list[Item]) -> int:
        return sum(item.record.params["tokens_to_generate"] for item in items)

    @staticmethod
    def results(items: list[Item], answer: dict) -> list[tuple[dict, Tokens]]:
        """(output record, its tokens) per item."""
        out = []
        cached = answer.get("cached_tokens") or [0] * len(items)  # a server that does not say found none
        for k, item in enumerate(items):
            record, sentence, offsets = item.record, answer["sentences"][k], answer["offsets"][k]
            sent = record.sent_prompt if record.sent_prompt is not None else record.prompt
            prompt_tokens = bisect_left(offsets, len(sent))  # the prompt's tokens end where its text does
            completion_tokens = len(answer["token_ids"][k]) - prompt_tokens
            completion = sentence[len(sent):] if sentence.startswith(sent) else sentence
            result = {"id": record.key, "sample": item.sample, "seed": item.seed, "prompt": record.prompt}
            if record.messages is not None:
                result["messages"] = record.messages
            result.update(completion=completion, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          params=record.params)
            if record.params["compute_logprob"] and answer.get("logprob"):
                result["logprob"] = answer["logprob"][k]
            out.append(({**result, **record.carried} if record.carried else result,
                        Tokens(prompt_tokens, completion_tokens, cached[k])))
        return out

    @staticmethod
    def error(item: Item, message: str, status: Optional[int], body: Any) -> dict:
        line = {"id": item.record.key, "sample": item.sample, "seed": item.seed, "line": item.record.line,
                "status_code": status, "error": message}
        return {**line, **item.record.carried} if item.record.carried else line


class OpenAIFormat:
    """OpenAI's batch file: {"custom_id", "method": "POST", "url": "/v1/completions" or "/v1/chat/completions",
    "body"} per line; out, {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}. The
    body is checked by the server, so a bad body lands in the errors file as OpenAI's would."""
    name, method = "openai", "POST"

    def __init__(self, batch_seed: int, rules: Optional[PromptRules] = None):
        self._batch_seed, self._rules = batch_seed, rules

    @staticmethod
    def route(items: list[Item]) -> str:
        return items[0].record.url

    def parse(self, obj: Any, index: int, line: int, where: str) -> tuple[Record, bool]:
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
        if obj["url"] not in OPENAI_URLS:
            raise LaunchError(f"{where}: url {obj['url']!r} is not served; fleetgen serves "
                              f"{' and '.join(OPENAI_URLS)} (embeddings are not served)")
        if not isinstance(obj["body"], dict):
            raise LaunchError(f"{where}: \"body\" must be a JSON object (a {obj['url']} request)")
        record = Record(index, line, obj["custom_id"], body=obj["body"], url=obj["url"])
        if self._rules is not None and self._rules.measure:
            self._measure(record, where)
        return record, True

    def _measure(self, record: Record, where: str) -> None:
        """The body's longest prompt against the context window; a cut one asks the server to cut it (vLLM's
        truncate_prompt_tokens). A body the server would refuse anyway is left to it."""
        body = record.body
        if record.url == OPENAI_URLS[1]:
            if not isinstance(body.get("messages"), list):
                return
            try:
                prompts = [self._rules.render(body["messages"], where)]
            except LaunchError:
                return
            new_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
            prompts = [p for p in prompts if isinstance(p, str)]
            new_tokens = body.get("max_tokens", 16)
        if not prompts or not (new_tokens is None or isinstance(new_tokens, int)):
            return
        record.fit = max((self._rules.fit(p, new_tokens) for p in prompts), key=lambda fit: fit.length)
        if record.keep is not None:
            record.body = {**body, "truncate_prompt_tokens": record.keep}

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
    def prefix_text(item: Item) -> str:
        """The body's prompt, or its chat messages as JSON (a list's text starts with its first items'), as text
        ("" for a prompt cut from the left)."""
        body = item.record.body
        if item.record.keep is not None:
            return ""
        prompt = body.get("messages") if item.record.url == OPENAI_URLS[1] else body.get("prompt")
        return prompt if isinstance(prompt, str) else json.dumps(prompt)

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
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens", 16)
        prompts = body.get("prompt")
        count = max(len(prompts), 1) if isinstance(prompts, list) else 1  # an empty list is still asked once
        return (max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 16) * count

    @staticmethod
    def results(items: list[Item], answer: dict) -> list[tuple[dict, Tokens]]:
        [item] = items
        usage = answer.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        record = {"id": _batch_request_id(), "custom_id": item.record.key,
                  "response": {"status_code": 200, "request_id": answer.get("id", _batch_request_id()),
                               "body": answer},
                  "error": None}
        return [(record, Tokens(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), cached))]

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
