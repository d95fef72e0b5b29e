"""The request bodies of both dialects, checked by typed, strict schemas, and their error messages.

Unknown fields are rejected (NeMo only logs them): a misspelt parameter silently ignored is a wrong answer
nobody notices. Every problem is a RequestError whose message names the field.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetgen.conf.schema import MAX_SEED, MAX_SENTENCES, Generation
from fleetgen.model.serve.engine import Engine


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateRequest(Generation):
    """NeMo's PUT /generate body: the sentences and NeMo's generation fields (conf/schema.py)."""
    sentences: list[str] = Field(min_length=1, max_length=MAX_SENTENCES)
    all_probs: bool = False  # whole log-probability rows; not a batch record's field (they would not be kept)
    task_ids: Any = None    # NeMo's p-tuning task ids: accepted and ignored
    neighbors: Any = None   # NeMo's RETRO neighbours: accepted and ignored
    truncate_prompt_tokens: Optional[int] = Field(None, ge=1)  # vLLM's: keep only each prompt's last k tokens
    json_schema: Optional[dict] = None  # inline only: a server reads no file a request names


class StreamOptions(_Request):
    include_usage: Optional[bool] = False  # a last chunk with the whole request's usage
    include_obfuscation: Optional[bool] = None  # OpenAI's padding against length side channels: none is added


class JsonSchemaFormat(_Request):
    """response_format's json_schema: OpenAI's structured outputs."""
    name: str
    description: Optional[str] = None
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: Optional[bool] = None  # fleetgen is always strict: the output matches the schema


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class OpenAISampling(_Request):
    """The sampling fields /v1/completions and /v1/chat/completions share (openai_api.sampling_of reads them);
    top_k and repetition_penalty are extensions, as in vLLM."""
    model: str
    temperature: float = Field(1.0, ge=0, le=100)  # 0 = greedy
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=1.0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, JSON's keys) -> bias in [-100, 100]
    stop: Union[None, str, list[str]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=MAX_SENTENCES)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = Field(None, ge=1)  # vLLM's: keep only the prompt's last k tokens
    # structured output, OpenAI's and vLLM's ways (at most one; structured.py turns it into a constraint)
    response_format: Optional[ResponseFormat] = None
    guided_json: Union[None, dict, str] = None   # a schema, or its JSON text
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None         # Lark (llguidance's dialect) or GBNF

    # fields OpenAI defines that only some values of can be honoured here: field -> (honoured values, why)
    HONOURED: ClassVar[dict[str, tuple[tuple, str]]] = {}

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAISampling):
    """OpenAI's POST /v1/completions body; a prompt may be text or token ids, one or a list."""
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # null: up to the context window
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[bool] = False
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    HONOURED: ClassVar[dict[str, tuple[tuple, str]]] = {
        **OpenAISampling.HONOURED,
        "suffix": ((None,), "insertion (text after the completion) is not served"),
    }

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt: text, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class ChatCompletionRequest(OpenAISampling):
    """OpenAI's POST /v1/chat/completions body. The messages are checked by chat_template.plain_messages."""
    messages: list[Any]
    max_tokens: Optional[int] = Field(None, ge=1)             # deprecated by OpenAI for the next one
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # null: up to the context window
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True  # vLLM's: end the prompt with the assistant turn's header
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Union[str, dict]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict] = None
    prediction: Optional[dict] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[dict] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    HONOURED: ClassVar[dict[str, tuple[tuple, str]]] = {
        **OpenAISampling.HONOURED,
        "tools": ((None, []), "tool calls are not served"),
        "tool_choice": ((None, "none", "auto"), "tool calls are not served"),
        "functions": ((None, []), "function calls are not served"),
        "function_call": ((None, "none", "auto"), "function calls are not served"),
        "modalities": ((None, ["text"]), "only text is generated"),
        "audio": ((None,), "only text is generated"),
        "prediction": ((None,), "predicted outputs are not served"),
        "reasoning_effort": ((None,), "this is not a reasoning model's API"),
        "verbosity": ((None,), "no verbosity control is served"),
        "web_search_options": ((None,), "web search is not served"),
        "store": ((None, False), "completions are not stored"),
        "service_tier": ((None, "auto", "default"), "one service tier is served"),
    }


def read_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(400, "body: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and _no_constant's
        raise RequestError(400, f"body is not valid JSON: {e}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse(schema: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(data).__name__}")
    try:
        request = schema.model_validate(data)
    except ValidationError as e:
        raise RequestError(400, _describe(e, schema)) from None
    if isinstance(request, OpenAISampling):
        _check_openai(request)
    return request


def _check_openai(request: OpenAISampling) -> None:
    """What a schema cannot say: values of OpenAI's fields that cannot be honoured here, and bounds that
    span fields."""
    for name, (honoured, why) in request.HONOURED.items():
        value = getattr(request, name)
        if value not in honoured:
            raise RequestError(400, f"{name}: {value!r} cannot be honoured: {why} (accepted: "
                                    f"{', '.join(json.dumps(v) for v in honoured)})")
    if request.stream_options is not None and not request.stream:
        raise RequestError(400, "stream_options: only with stream=true")
    if isinstance(request, CompletionRequest):
        if not request.prompts:
            raise RequestError(400, "prompt: the list of prompts is empty")
        if len(request.prompts) * request.n > MAX_SENTENCES:
            raise RequestError(400, f"prompt, n: at most {MAX_SENTENCES} completions per request, got "
                                    f"{len(request.prompts)} prompt(s) × n={request.n}")
        if request.best_of is not None and request.best_of != request.n:
            raise RequestError(400, f"best_of: {request.best_of} cannot be honoured: completions are not ranked, "
                                    f"so best_of must equal n ({request.n})")
    if isinstance(request, ChatCompletionRequest):
        if None not in (request.max_tokens, request.max_completion_tokens) and \
                request.max_tokens != request.max_completion_tokens:
            raise RequestError(400, f"max_tokens={request.max_tokens} and max_completion_tokens="
                                    f"{request.max_completion_tokens} disagree; give one")
        if request.top_logprobs and not request.logprobs:
            raise RequestError(400, "top_logprobs: only with logprobs=true")


def _describe(error: ValidationError, schema: type[BaseModel]) -> str:
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
