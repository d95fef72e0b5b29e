"""The request bodies of both dialects, checked by typed, strict schemas, and their error messages.

Unknown fields are rejected (NeMo only logs them): a misspelt parameter silently ignored is a wrong answer
nobody notices. Every problem is a RequestError whose message names the field.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

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
    json_schema: Optional[dict] = None  # inline only: a server reads no file a request names


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
    stream: bool = False
    user: Optional[str] = None
    # structured output, OpenAI's and vLLM's ways (at most one; structured.py turns it into a constraint)
    response_format: Optional[ResponseFormat] = None
    guided_json: Union[None, dict, str] = None   # a schema, or its JSON text
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None         # Lark (llguidance's dialect) or GBNF

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(OpenAISampling):
    """OpenAI's POST /v1/completions body."""
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


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
    if isinstance(request, CompletionRequest) and not request.prompts:
        raise RequestError(400, "prompt: the list of prompts is empty")
    if isinstance(request, CompletionRequest) and len(request.prompts) > MAX_SENTENCES:
        raise RequestError(400, f"prompt: at most {MAX_SENTENCES} prompts per request, got {len(request.prompts)}")
    return request


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
