"""What a constrained sequence's output must match, compiled and checked by llguidance; torch-free, so that
the launcher checks a batch's schemas before submission with the same code the server runs.

A Constraint holds llguidance's grammar text (a JSON document naming a JSON schema, a regex or a Lark
grammar). The server gives it to each constrained sequence's matcher (model/serve/grammar.py).

Why llguidance and not xgrammar (benchmarks/grammar_libraries.py, README): llguidance refuses the schema
keywords it cannot enforce ("Unimplemented keys: ["not"]"), where xgrammar 0.2.9 compiles `not` and
if/then/else into grammars whose outputs break the schema; it is a 3 MB wheel without dependencies (xgrammar
pulls triton, transformers and tvm-ffi); and its masks, 0.2 ms for 16 rows, are far below a decode step.

JSON is compact (no free whitespace): a small model otherwise loses its token budget to newlines.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

JSON_OPTIONS = {"whitespace_flexible": False}
ANY_JSON_OBJECT = {"type": "object"}


class ConstraintError(ValueError):
    """A constraint llguidance cannot compile; the message says what (an unsupported keyword, a regex error)."""


@dataclass(frozen=True)
class Constraint:
    kind: str      # "json_schema" | "regex" | "choice" | "grammar": what the request gave
    grammar: str   # llguidance's grammar text


def json_schema(schema: Union[dict, bool]) -> Constraint:
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"a JSON schema is an object, got {type(schema).__name__}")
    from llguidance import LLMatcher

    return _checked("json_schema", LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS))


def regex(pattern: str) -> Constraint:
    from llguidance import LLMatcher

    return _checked("regex", LLMatcher.grammar_from_regex(pattern))


def choice(options: list[str]) -> Constraint:
    """Exactly one of the strings."""
    if not options or not all(isinstance(o, str) for o in options):
        raise ConstraintError("a choice is a non-empty list of strings")
    from llguidance import grammar_from

    return _checked("choice", grammar_from("choice", json.dumps(options)))


def grammar(text: str) -> Constraint:
    """A Lark grammar (llguidance's dialect) or a GBNF/EBNF one as llama.cpp writes them."""
    from llguidance import grammar_from

    try:
        return _checked("grammar", grammar_from("grammar", text))
    except ValueError as e:  # llguidance's GBNF-to-Lark conversion
        raise ConstraintError(str(e)) from None


def load_json_schema(value: Union[dict, bool, str]) -> Union[dict, bool]:
    """A schema given inline, or the path of a .json file holding one."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConstraintError(f"{path}: cannot read the JSON schema file: {e.strerror}") from None
    except ValueError as e:
        raise ConstraintError(f"{path}: not JSON: {e}") from None


def _checked(kind: str, text: str) -> Constraint:
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(text)
    if error:
        raise ConstraintError(error.strip())
    return Constraint(kind, text)

