"""Random JSON schemas of the kinds people constrain generation with, for the structured-output tests and
benchmarks/structured.py.

Each schema is finite by construction (additionalProperties false, bounded strings, arrays and integers,
numbers in multiples of 0.25, whose digits would otherwise never need to end, a depth limit), so that a
constrained sequence always has a way to end within a small token budget: a test can demand that every
output is complete.
"""
from __future__ import annotations

import random

WORDS = ["name", "id", "tags", "score", "ok", "items", "kind", "note", "size", "when", "city", "rank"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """One schema; the top level is always an object, as in response_format's use."""
    kinds = ["object"] if depth == 0 else ["object", "array", "string", "enum", "integer", "number", "boolean",
                                           "null", "anyOf", "const"]
    kind = rng.choice(kinds if depth < 2 else kinds[2:])
    if kind == "object":
        names = rng.sample(WORDS, rng.randint(1, 3))
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": [n for n in names if rng.random() < 0.7], "additionalProperties": False}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}
    if kind == "string":
        low = rng.randint(0, 3)
        return rng.choice([{"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 6)},
                           {"type": "string", "pattern": "^[a-z]{1,5}-[0-9]{2}$"},
                           {"type": "string", "format": "date", "maxLength": 10}])
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000]), "multipleOf": 0.25}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    if kind == "const":
        return {"const": rng.choice(["fixed", 7, False])}
    return {"type": kind}


def random_schemas(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]
