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


def completion_sequences(request: CompletionRequest, engine: Engine) -> list[SequenceRequest]:
    if request.stream and request.logprobs is not None:
        raise RequestError(400, "logprobs: not available with stream=true")
    if request.n != 1:
        raise RequestError(400, "n: only n=1 is served")
    sampling, stop = sampling_of(request, engine), stop_of(request, engine)
    constraint = constraint_of(request, engine)
    sequences = []
    for i, text in enumerate(request.prompts):
        prompt = engine.tokenizer.encode(text)
        where = "prompt" if isinstance(request.prompt, str) else f"prompt[{i}]"
        check_prompt(prompt, where, request.max_tokens, "max_tokens", engine)
        seed = None if request.seed is None else request.seed + i
        sequences.append(SequenceRequest(tuple(prompt), request.max_tokens, replace(sampling, seed=seed), stop,
                                         logprobs=request.logprobs is not None,
                                         full_logprobs=bool(request.logprobs), constraint=constraint))
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
