"""OpenAI's /v1/completions and /v1/models: requests become engine sequences, finished ones OpenAI's answers
(whole or as stream chunks)."""
from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Optional

from fleetgen.model.checkpoint.source import Tokenizer
from fleetgen.model.serve.detokenize import CompletionText, token_spans
from fleetgen.model.serve.engine import Engine, Sampling, SequenceRequest, SequenceResult, StopCondition
from fleetgen.model.serve.request_schemas import CompletionRequest, OpenAISampling, RequestError, check_prompt
from fleetgen.model.serve.structured import constraint_of

MAX_LOGIT_BIAS = 100  # OpenAI's bound on a logit_bias value


def sampling_of(request: OpenAISampling, engine: Engine) -> Sampling:
    """The engine's sampling settings for an OpenAI request (completions or chat); temperature 0 is greedy."""
    greedy = request.temperature == 0
    return Sampling(greedy=greedy, temperature=1.0 if greedy else request.temperature, top_k=request.top_k,
                    top_p=request.top_p, repetition_penalty=request.repetition_penalty,
                    presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                    logit_bias=_logit_bias(request.logit_bias or {}, engine.vocab_size))


def _logit_bias(bias: dict[str, float], vocab_size: int) -> tuple:
    pairs = []
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise RequestError(400, f"logit_bias: key {key!r} is not a token id of the model's vocabulary of "
                                    f"{vocab_size}")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise RequestError(400, f"logit_bias: the bias of token {key} is {value}, outside "
                                    f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
        pairs.append((int(key), float(value)))
    return tuple(sorted(pairs))


def stop_of(request: OpenAISampling, engine: Engine, extra: tuple = ()) -> StopCondition:
    """The end-of-document token, the request's stop strings, and extra ones (a chat template's turn ends)."""
    if any(not s for s in request.stops):
        raise RequestError(400, "stop: a stop string is empty")
    return StopCondition(frozenset() if engine.eos_id is None else frozenset({engine.eos_id}),
                         tuple(request.stops) + tuple(extra))


def prompt_sequences(prompt: list[int], where: str, request: OpenAISampling, max_tokens: Optional[int],
                     max_field: str, engine: Engine, first: int, sampling: Sampling, stop: StopCondition,
                     logprobs: bool, full_logprobs: bool, constraint=None) -> list[SequenceRequest]:
    """A prompt's n sequences; the k-th completion of the request (first + j) is seeded with seed + k, as a
    batch seeds a record's samples. max_tokens None: up to the context window."""
    if request.truncate_prompt_tokens is not None:
        prompt = prompt[-request.truncate_prompt_tokens:]
    if max_tokens is None:
        if len(prompt) >= engine.max_seq_len:
            raise RequestError(400, f"{where} is {len(prompt)} tokens, no fewer than the context window of "
                                    f"{engine.max_seq_len}: no room for a completion")
        max_tokens = engine.max_seq_len - len(prompt)
    check_prompt(prompt, where, max_tokens, max_field, engine)
    return [SequenceRequest(tuple(prompt), max_tokens,
                            replace(sampling, seed=None if request.seed is None else request.seed + first + j),
                            stop, logprobs=logprobs, full_logprobs=full_logprobs, constraint=constraint)
            for j in range(request.n)]


def completion_sequences(request: CompletionRequest, engine: Engine) -> list[SequenceRequest]:
    """n sequences for each prompt, prompt after prompt."""
    if request.stream and request.logprobs is not None:
        raise RequestError(400, "logprobs: not available with stream=true")
    sampling, stop = sampling_of(request, engine), stop_of(request, engine)
    constraint = constraint_of(request, engine)
    sequences = []
    for i, prompt in enumerate(request.prompts):
        where = "prompt" if len(request.prompts) == 1 else f"prompt[{i}]"
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        sequences += prompt_sequences(ids, where, request, request.max_tokens, "max_tokens", engine,
                                      i * request.n, sampling, stop, logprobs=request.logprobs is not None,
                                      full_logprobs=bool(request.logprobs), constraint=constraint)
    return sequences


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def shown_text(result: SequenceResult, stop: StopCondition, tokenizer: Tokenizer, eos_id: Optional[int]) -> str:
    """The completion's text: without the end-of-document token, cut before the first stop string."""
    text = CompletionText(tokenizer, result.prompt, list(stop.strings), eos_id)
    for token in result.tokens:
        text.add(token)
    text.finish()
    return text.text


def usage(results: list[SequenceResult], n: int) -> dict:
    """OpenAI's usage: each prompt's tokens once, however many completions it has; of those, the ones its first
    completion found in the KV cache (prompt_tokens_details.cached_tokens)."""
    prompt_tokens = sum(len(r.prompt) for r in results[::n])
    completion_tokens = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results[::n])}}


def _prompt_text(request: CompletionRequest, index: int, ids: list[int], tokenizer: Tokenizer) -> str:
    """The text echo shows for completion index: its prompt as given, or the decoded ids it was given as."""
    prompt = request.prompts[index // request.n]
    return prompt if isinstance(prompt, str) else tokenizer.decode(ids)


def completion_response(request: CompletionRequest, sequences: list[SequenceRequest],
                        results: list[SequenceResult], engine: Engine, model: str) -> dict:
    choices = []
    for index, (sequence, result) in enumerate(zip(sequences, results)):
        text = shown_text(result, sequence.stop, engine.tokenizer, engine.eos_id)
        shown = _prompt_text(request, index, result.prompt, engine.tokenizer) + text if request.echo else text
        logprobs = None
        if request.logprobs is not None:
            logprobs = _openai_logprobs(request, result, engine, len(shown))
        choices.append({"text": shown, "index": index, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
    return {"id": completion_id(), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results, request.n)}


class CompletionStream:
    """A streamed completion's chunks (server.py sends them as server-sent events)."""

    def __init__(self, request: CompletionRequest, model: str, tokenizer: Tokenizer):
        self.request, self.model, self.tokenizer = request, model, tokenizer
        self.id, self.created = completion_id(), int(time.time())

    def opening(self, sequences: list[SequenceRequest]) -> list[dict]:
        """echo: each prompt first."""
        if not self.request.echo:
            return []
        return [self._chunk(k, _prompt_text(self.request, k, list(s.prompt), self.tokenizer), None)
                for k, s in enumerate(sequences)]

    def delta(self, index: int, text: str) -> dict:
        return self._chunk(index, text, None)

    def final(self, index: int, text: str, finish_reason: str) -> dict:
        return self._chunk(index, text, finish_reason)

    def usage(self, results: list[SequenceResult]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(results, self.request.n)}

    def _chunk(self, index: int, text: str, finish_reason: Optional[str]) -> dict:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk


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
    return {token_string(tokenizer, i): v for i, v in zip(ids.tolist(), values.tolist())}


def token_string(tokenizer: Tokenizer, token: int) -> str:
    """Its text alone, or its vocabulary piece when that is not whole characters (distinct dict keys)."""
    text = tokenizer.decode([token])
    return tokenizer.id_to_piece(token) if "\ufffd" in text or not text else text


def models_response(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "fleetgen"}]}
