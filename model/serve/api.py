"""Request schemas and their checks, and the answers built from finished sequences.

Two dialects: NeMo's PUT /generate (megatron_gpt_eval.py's field names, defaults and response) and
OpenAI's /v1/completions. Bodies are checked by typed, strict schemas; unknown fields are rejected (NeMo
only logs them): a misspelt parameter silently ignored is a wrong answer nobody notices. Every problem is a
RequestError whose message names the field.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from itertools import accumulate
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetgen.model.checkpoint.source import Tokenizer
from fleetgen.model.serve.engine import Engine, Sampling, SequenceRequest, SequenceResult, StopCondition

END_OF_DOCUMENT = "<|endoftext|>"   # NeMo's name for the end-of-document token, whatever the tokenizer
MAX_SENTENCES = 128                 # NeMo's limit per request
MAX_SEED = 2 ** 63 - 1 - MAX_SENTENCES  # sentence i is seeded with random_seed + i
DETOKENIZE_CONTEXT = 5              # tokens of context that fix how the next token decodes (vLLM's choice)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateRequest(_Request):
    """NeMo's PUT /generate body."""
    sentences: list[str] = Field(min_length=1, max_length=MAX_SENTENCES)
    tokens_to_generate: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, le=100)
    add_BOS: bool = False
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.9, ge=0, le=1)
    greedy: bool = False
    all_probs: bool = False
    repetition_penalty: float = Field(1.0, ge=1.0)
    min_tokens_to_generate: int = Field(0, ge=0)
    end_strings: list[str] = [END_OF_DOCUMENT]
    compute_logprob: bool = False
    random_seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    task_ids: Any = None    # NeMo's p-tuning task ids: accepted and ignored
    neighbors: Any = None   # NeMo's RETRO neighbours: accepted and ignored


class CompletionRequest(_Request):
    """OpenAI's POST /v1/completions body; top_k and repetition_penalty are extensions (as in vLLM)."""
    model: str
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)  # 0 = greedy
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=1.0)
    stop: Union[None, str, list[str]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    user: Optional[str] = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def read_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(400, "body: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and _no_constant's
        raise RequestError(400, f"body is not valid JSON: {e}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse(schema: type[_Request], data: Any) -> Any:
    if not isinstance(data, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(data).__name__}")
    try:
        request = schema.model_validate(data)
    except ValidationError as e:
        raise RequestError(400, _describe(e, schema)) from None
    if isinstance(request, CompletionRequest) and not request.prompts:
        raise RequestError(400, "prompt: the list of prompts is empty")
    if isinstance(request, CompletionRequest) and len(request.prompts) > MAX_SENTENCES:
        raise RequestError(400, f"prompt: at most {MAX_SENTENCES} prompts per request, got {len(request.prompts)}")
    return request


def _describe(error: ValidationError, schema: type[_Request]) -> str:
    problems = []
    for err in error.errors():
        where = ".".join(str(part) for part in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown field {where!r}; valid fields: {', '.join(schema.model_fields)}")
        elif err["type"] == "missing":
            problems.append(f"{where}: required field missing")
        else:
            shown = repr(err.get("input"))
            problems.append(f"{where}: {err['msg']} (got {shown[:80] + '...' if len(shown) > 80 else shown})")
    return "; ".join(problems)


# ---- NeMo's /generate

def nemo_sequences(request: GenerateRequest, engine: Engine) -> list[SequenceRequest]:
    tokenizer = engine.tokenizer
    if request.add_BOS and tokenizer.bos_id is None:
        raise RequestError(400, "add_BOS: the model's tokenizer has no BOS token")
    if any(not s for s in request.end_strings):
        raise RequestError(400, "end_strings: an end string is empty")
    sampling = Sampling(greedy=request.greedy, temperature=request.temperature, top_k=request.top_k,
                        top_p=request.top_p, repetition_penalty=request.repetition_penalty,
                        min_tokens=request.min_tokens_to_generate)
    stop = nemo_stop(request.end_strings, tokenizer, engine.eos_id)
    sequences = []
    for i, sentence in enumerate(request.sentences):
        prompt = [tokenizer.bos_id] * request.add_BOS + tokenizer.encode(sentence)
        check_prompt(prompt, f"sentences[{i}]", request.tokens_to_generate, "tokens_to_generate", engine)
        seed = None if request.random_seed is None else request.random_seed + i
        sequences.append(SequenceRequest(tuple(prompt), request.tokens_to_generate, replace(sampling, seed=seed),
                                         stop, logprobs=request.compute_logprob, full_logprobs=request.all_probs))
    return sequences


def nemo_stop(end_strings: list[str], tokenizer: Tokenizer, eos_id: Optional[int]) -> StopCondition:
    """As NeMo: the end-of-document token always ends a sequence; an end string that is one token (or the
    end-of-document piece) also ends it as that token; every other string ends it once the text holds it."""
    ids = set() if eos_id is None else {eos_id}
    strings = []
    for s in end_strings:
        if eos_id is not None and s in (END_OF_DOCUMENT, tokenizer.id_to_piece(eos_id)):
            continue
        encoded = tokenizer.encode(s)
        if len(encoded) == 1:
            ids.add(encoded[0])
        strings.append(s)
    return StopCondition(frozenset(ids), tuple(strings))


def check_prompt(prompt: list[int], where: str, new_tokens: int, new_field: str, engine: Engine) -> None:
    if not prompt:
        raise RequestError(400, f"{where} is empty: there is no token to continue from")
    if len(prompt) + new_tokens > engine.max_seq_len:
        raise RequestError(400, f"{where} is {len(prompt)} tokens; with {new_field}={new_tokens} that makes "
                                f"{len(prompt) + new_tokens}, more than the context window of "
                                f"{engine.max_seq_len} tokens")
    outside = [t for t in prompt if not 0 <= t < engine.vocab_size]
    if outside:
        raise RequestError(400, f"{where}: token id {outside[0]} is outside the model's vocabulary of "
                                f"{engine.vocab_size}")


def nemo_response(request: GenerateRequest, results: list[SequenceResult], tokenizer: Tokenizer) -> dict:
    answer = {"sentences": [], "tokens": [], "logprob": None, "token_ids": [], "offsets": []}
    for result in results:
        ids = result.prompt + result.tokens
        pieces, offsets, text = token_spans(tokenizer, ids, hidden=int(request.add_BOS))
        answer["sentences"].append(text)
        answer["tokens"].append(pieces)
        answer["token_ids"].append(ids)
        answer["offsets"].append(offsets)
    if request.compute_logprob:
        answer["logprob"] = [r.logprobs for r in results]
    if request.all_probs:
        answer["full_logprob"] = [r.full_logprobs.tolist() for r in results]
    return answer


# ---- text of tokens

class IncrementalText:
    """The text each new token adds to a decoded sequence. Decoding a short window rather than one token
    keeps what depends on context right: a SentencePiece word's leading space, a character split over
    byte-level tokens (no text until its last byte arrives)."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer, self.ids = tokenizer, list(context)
        self.prefix_start, self.read_start = max(0, len(self.ids) - DETOKENIZE_CONTEXT), len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What tokens still held back add (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_start:self.read_start])
        full = self.tokenizer.decode(self.ids[self.prefix_start:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_start, self.read_start = self.read_start, len(self.ids)
        return full[len(prefix):]


def token_spans(tokenizer: Tokenizer, ids: list[int], hidden: int = 0) -> tuple[list[str], list[int], str]:
    """Each token's string and character offset in the text of ids[hidden:], and that text. A token adding
    no text (a special token, the first bytes of a character) shows its vocabulary piece; the first
    `hidden` tokens (an added BOS) are not part of the text."""
    text = IncrementalText(tokenizer)
    parts = [text.add(t) for t in ids[hidden:]]
    if parts:
        parts[-1] += text.flush()
    offsets = list(accumulate([0] * hidden + [len(p) for p in parts], initial=0))[:len(ids)]
    pieces = [s or tokenizer.id_to_piece(t) for s, t in zip([""] * hidden + parts, ids)]
    return pieces, offsets, "".join(parts)


class CompletionText:
    """An OpenAI completion's text as its tokens arrive: the end-of-document token adds none, and the text
    ends before the first stop string. Until the end, text that may begin a stop string is held back."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stops: list[str], eos_id: Optional[int]):
        self._text, self._eos_id, self._stops = IncrementalText(tokenizer, prompt), eos_id, stops
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent = "", 0

    def add(self, token: int) -> str:
        """New text that is safe to show."""
        if token != self._eos_id:
            self.text += self._text.add(token)
        return self._release(min(self._end(), len(self.text) - self._holdback))

    def finish(self) -> str:
        self.text += self._text.flush()
        self.text = self.text[:self._end()]
        return self._release(len(self.text))

    def _end(self) -> int:
        """Where the shown text ends: before the first stop string."""
        return min([self.text.find(s) for s in self._stops if s in self.text] + [len(self.text)])

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        shown, self.sent = self.text[self.sent:upto], upto
        return shown


# ---- OpenAI's /v1/completions

def completion_sequences(request: CompletionRequest, engine: Engine) -> list[SequenceRequest]:
    if any(not s for s in request.stops):
        raise RequestError(400, "stop: a stop string is empty")
    if request.stream and request.logprobs is not None:
        raise RequestError(400, "logprobs: not available with stream=true")
    greedy = request.temperature == 0
    sampling = Sampling(greedy=greedy, temperature=1.0 if greedy else request.temperature, top_k=request.top_k,
                        top_p=request.top_p, repetition_penalty=request.repetition_penalty)
    stop = StopCondition(frozenset() if engine.eos_id is None else frozenset({engine.eos_id}), tuple(request.stops))
    sequences = []
    for i, text in enumerate(request.prompts):
        prompt = engine.tokenizer.encode(text)
        where = "prompt" if isinstance(request.prompt, str) else f"prompt[{i}]"
        check_prompt(prompt, where, request.max_tokens, "max_tokens", engine)
        seed = None if request.seed is None else request.seed + i
        sequences.append(SequenceRequest(tuple(prompt), request.max_tokens, replace(sampling, seed=seed), stop,
                                         logprobs=request.logprobs is not None,
                                         full_logprobs=bool(request.logprobs)))
    return sequences


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_text(request: CompletionRequest, result: SequenceResult, tokenizer: Tokenizer,
                    eos_id: Optional[int]) -> str:
    text = CompletionText(tokenizer, result.prompt, request.stops, eos_id)
    for token in result.tokens:
        text.add(token)
    text.finish()
    return text.text


def completion_response(request: CompletionRequest, results: list[SequenceResult], engine: Engine,
                        model: str) -> dict:
    choices = []
    for index, (prompt, result) in enumerate(zip(request.prompts, results)):
        text = completion_text(request, result, engine.tokenizer, engine.eos_id)
        shown = prompt + text if request.echo else text
        logprobs = None
        if request.logprobs is not None:
            logprobs = _openai_logprobs(request, result, engine, len(shown))
        choices.append({"text": shown, "index": index, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
    prompt_tokens = sum(len(r.prompt) for r in results)
    completion_tokens = sum(len(r.tokens) for r in results)
    return {"id": completion_id(), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}


def _openai_logprobs(request: CompletionRequest, result: SequenceResult, engine: Engine, shown: int) -> dict:
    """OpenAI's legacy logprobs object over the tokens whose text is shown (prompt ones with echo)."""
    tokenizer = engine.tokenizer
    visible = result.tokens[:-1] if result.tokens[-1:] == [engine.eos_id] else result.tokens
    ids = result.prompt + visible
    pieces, offsets, _ = token_spans(tokenizer, ids)
    first = 0 if request.echo else len(result.prompt)
    base = 0 if request.echo else (offsets[first] if first < len(ids) else 0)
    keep = [j for j in range(first, len(ids)) if offsets[j] - base < shown or j < len(result.prompt)]
    answer = {"tokens": [pieces[j] for j in keep], "text_offset": [offsets[j] - base for j in keep],
              "token_logprobs": [result.logprobs[j - 1] if j else None for j in keep], "top_logprobs": None}
    if request.logprobs:
        answer["top_logprobs"] = [_top(result.full_logprobs[j - 1], request.logprobs, tokenizer) if j else None
                                  for j in keep]
    return answer


def _top(row, k: int, tokenizer: Tokenizer) -> dict:
    values, ids = row.topk(k)
    return {_token_string(tokenizer, i): v for i, v in zip(ids.tolist(), values.tolist())}


def _token_string(tokenizer: Tokenizer, token: int) -> str:
    """Its text alone, or its vocabulary piece when that is not whole characters (distinct dict keys)."""
    text = tokenizer.decode([token])
    return tokenizer.id_to_piece(token) if "\ufffd" in text or not text else text


def completion_chunk(cid: str, created: int, model: str, index: int, text: str,
                     finish_reason: Optional[str]) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}


def models_response(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "fleetgen"}]}
