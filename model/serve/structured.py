"""Structured output from a request: OpenAI's response_format, vLLM's guided_* fields, NeMo's (and batch
records') json_schema, each turned into the sequence's Constraint (model/constraints.py), or a 400 naming
the field and what the grammar engine does not support."""
from __future__ import annotations

import json
from typing import Optional

from fleetgen.model import constraints
from fleetgen.model.constraints import Constraint, ConstraintError
from fleetgen.model.serve.engine import Engine
from fleetgen.model.serve.request_schemas import GenerateRequest, OpenAISampling, RequestError

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def constraint_of(request: OpenAISampling, engine: Engine) -> Optional[Constraint]:
    """The constraint a completions or chat request asks for, None when it asks for none."""
    given = [name for name in GUIDED if getattr(request, name) is not None]
    formatted = request.response_format is not None and request.response_format.type != "text"
    if formatted:
        given.insert(0, "response_format")
    if len(given) > 1:
        raise RequestError(400, f"{', '.join(given)}: give at most one way to constrain the output")
    if not given:
        return None
    field = given[0]
    try:
        if field == "response_format":
            constraint = _response_format(request)
        elif field == "guided_json":
            constraint = constraints.json_schema(_schema_text(request.guided_json))
        elif field == "guided_regex":
            constraint = constraints.regex(request.guided_regex)
        elif field == "guided_choice":
            constraint = constraints.choice(request.guided_choice)
        else:
            constraint = constraints.grammar(request.guided_grammar)
        return checked(constraint, engine)
    except ConstraintError as e:
        raise RequestError(400, f"{field}: {e}") from None


def nemo_constraint(request: GenerateRequest, engine: Engine) -> Optional[Constraint]:
    """NeMo's /generate and fleetgen batch records: json_schema (already compiled once by its validator)."""
    if request.json_schema is None:
        return None
    try:
        return checked(constraints.json_schema(request.json_schema), engine)
    except ConstraintError as e:
        raise RequestError(400, f"json_schema: {e}") from None


def checked(constraint: Constraint, engine: Engine) -> Constraint:
    """The constraint, once a matcher over this model's vocabulary has been built from it."""
    engine.grammars.matcher(constraint)
    return constraint


def _response_format(request: OpenAISampling) -> Constraint:
    response_format = request.response_format
    if response_format.type == "json_object":
        return constraints.json_schema(constraints.ANY_JSON_OBJECT)
    if response_format.json_schema is None:
        raise ConstraintError("type json_schema needs a json_schema object ({\"name\": ..., \"schema\": ...})")
    return constraints.json_schema(response_format.json_schema.schema_)


def _schema_text(value) -> dict:
    if isinstance(value, dict):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise ConstraintError(f"not a JSON schema: {e}") from None
