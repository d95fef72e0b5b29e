"""OpenAI's /v1/chat/completions: messages rendered by the model's chat template become engine sequences, and
finished ones chat completions (whole or as stream chunks). Sampling, stops, n and usage are the completions'
(openai_api.py); a template's turn markers stop generation too."""
from __future__ import annotations

import time
import uuid
from typing import Optional

from fleetgen.model.chat_template import ChatTemplate, ChatTemplateError, plain_messages
from fleetgen.model.checkpoint.source import Tokenizer
from fleetgen.model.serve.detokenize import token_spans
from fleetgen.model.serve.engine import Engine, SequenceRequest, SequenceResult
from fleetgen.model.serve.openai_api import prompt_sequences, sampling_of, shown_text, stop_of, token_string, usage
from fleetgen.model.serve.request_schemas import ChatCompletionRequest, RequestError
from fleetgen.model.serve.structured import constraint_of

NO_TEMPLATE = ("this model has no chat template: set model.chat_template to a built-in one (nemotron4, chatml) or "
               "to a jinja file, or use /v1/completions")


def chat_prompt(request: ChatCompletionRequest, template: Optional[ChatTemplate]) -> str:
    if template is None:
        raise RequestError(400, f"messages: {NO_TEMPLATE}")
    try:
        return template.render(plain_messages(request.messages), request.add_generation_prompt)
    except ChatTemplateError as e:
        raise RequestError(400, str(e)) from None


def chat_sequences(request: ChatCompletionRequest, engine: Engine,
                   template: Optional[ChatTemplate]) -> list[SequenceRequest]:
    if request.stream and request.logprobs:
        raise RequestError(400, "logprobs: not available with stream=true")
    prompt = engine.tokenizer.encode(chat_prompt(request, template))
    max_tokens, field = request.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None and request.max_tokens is not None:
        max_tokens, field = request.max_tokens, "max_tokens"
    return prompt_sequences(prompt, "messages", request, max_tokens, field, engine, 0, sampling_of(request, engine),
                            stop_of(request, engine, template.stops), logprobs=bool(request.logprobs),
                            full_logprobs=bool(request.logprobs and request.top_logprobs),
                            constraint=constraint_of(request, engine))


def chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_response(request: ChatCompletionRequest, sequences: list[SequenceRequest], results: list[SequenceResult],
                  engine: Engine, model: str) -> dict:
    choices = []
    for index, (sequence, result) in enumerate(zip(sequences, results)):
        text = shown_text(result, sequence.stop, engine.tokenizer, engine.eos_id)
        logprobs = {"content": _content_logprobs(request, result, engine, len(text))} if request.logprobs else None
        choices.append({"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": logprobs, "finish_reason": result.finish_reason})
    return {"id": chat_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results, request.n)}


def _content_logprobs(request: ChatCompletionRequest, result: SequenceResult, engine: Engine,
                      shown: int) -> list[dict]:
    """OpenAI's chat logprobs: one entry per generated token whose text is shown (the end-of-document token
    and text past a stop string are not)."""
    tokenizer, start = engine.tokenizer, len(result.prompt)
    pieces, offsets, _ = token_spans(tokenizer, result.prompt + result.tokens)
    entries = []
    for t, token in enumerate(result.tokens):
        position = start + t
        if token == engine.eos_id or offsets[position] - offsets[start] >= shown:
            break
        entry = _entry(pieces[position], result.logprobs[position - 1])
        if request.top_logprobs:
            values, ids = result.full_logprobs[position - 1].topk(request.top_logprobs)
            entry["top_logprobs"] = [_entry(token_string(tokenizer, i), v)
                                     for i, v in zip(ids.tolist(), values.tolist())]
        else:
            entry["top_logprobs"] = []
        entries.append(entry)
    return entries


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


class ChatStream:
    """A streamed chat completion's chunks: the assistant role first, then content deltas, a last chunk per
    choice with its finish_reason (server.py sends them as server-sent events)."""

    def __init__(self, request: ChatCompletionRequest, model: str, tokenizer: Tokenizer):
        self.request, self.model = request, model
        self.id, self.created = chat_id(), int(time.time())

    def opening(self, sequences: list[SequenceRequest]) -> list[dict]:
        return [self._chunk(k, {"role": "assistant", "content": ""}, None) for k in range(len(sequences))]

    def delta(self, index: int, text: str) -> dict:
        return self._chunk(index, {"content": text}, None)

    def final(self, index: int, text: str, finish_reason: str) -> dict:
        return self._chunk(index, {"content": text} if text else {}, finish_reason)

    def usage(self, results: list[SequenceResult]) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(results, self.request.n)}

    def _chunk(self, index: int, delta: dict, finish_reason: Optional[str]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk
