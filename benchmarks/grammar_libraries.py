"""xgrammar against llguidance, the two grammar engines vLLM and SGLang use: JSON-schema coverage, compile time,
and the time to fill the allowed-token bitmask of 16 rows, on one CPU thread each, over the same vocabulary.

The vocabulary: a byte-level BPE of 32000 entries trained here (once, into benchmarks/results/grammar_vocab/)
on recipes/data's corpus and Python's standard library sources (a GPT-2-like trie: words, code, punctuation).
Each library gets the same token bytes (model/serve/vocabulary.py) and compact JSON (no free whitespace), as
fleetgen uses them.

    python benchmarks/grammar_libraries.py        # prints the tables that README's paragraph quotes
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleetgen.model.serve.vocabulary import token_bytes  # noqa: E402
from fleetgen.model.tokenizer import load_tokenizer  # noqa: E402
from tests.json_schemas import random_schemas  # noqa: E402

ROWS, STEPS = 16, 64

FEATURES = {  # one schema a JSON-schema feature people use
    "enum/const": {"type": "object", "properties": {"a": {"enum": ["x", 1, None]}, "b": {"const": 3}}},
    "min/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format email": {"type": "string", "format": "email"},
    "format uuid": {"type": "string", "format": "uuid"},
    "integer range": {"type": "integer", "minimum": -5, "maximum": 1234},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "min/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "string"}}},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
    "min/maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "$ref/$defs": {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}}},
                   "type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}},
    "recursive $ref": {"$defs": {"t": {"type": "object", "properties": {"kids": {"type": "array",
                                                                                   "items": {"$ref": "#/$defs/t"}}}}},
                       "$ref": "#/$defs/t"},
    "type list": {"type": ["string", "null"]},
}


def build_tokenizer(directory: Path):
    import inspect
    import json as json_module

    from tokenizers import ByteLevelBPETokenizer

    if not (directory / "vocab.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        texts = [p.read_text() for p in (ROOT / "recipes/data/corpus").glob("*.txt")]
        stdlib = Path(inspect.getsourcefile(json_module)).parents[1]
        texts += [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))]
        tokenizer = ByteLevelBPETokenizer()
        tokenizer.train_from_iterator(texts, vocab_size=32000, special_tokens=["<|endoftext|>"])
        tokenizer.save_model(str(directory))
    return load_tokenizer(directory)


class XGrammar:
    name = "xgrammar 0.2.9"

    def __init__(self, vocab: list[bytes], eos: int, encode):
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.words = (len(vocab) + 31) // 32

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance 1.9.1"

    def __init__(self, vocab: list[bytes], eos: int, encode):
        import llguidance
        import llguidance.torch
        self.ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(vocab, eos, encode)))

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        error = self.ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        return grammar

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tokenizer, compiled)

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        self.ll.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class _Wrapped:
    """What llguidance's TokenizerWrapper reads from a tokenizer: the token bytes and an encoder."""

    def __init__(self, vocab: list[bytes], eos: int, encode):
        self.tokens, self.eos_token_id, self.bos_token_id = vocab, eos, None
        self.special_token_ids = [eos]
        self.encode = encode

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


def coverage(engine) -> dict[str, str]:
    out = {}
    for name, schema in FEATURES.items():
        try:
            engine.compile(schema)
            out[name] = "yes"
        except Exception as e:  # each library raises its own kind
            out[name] = f"no ({str(e).splitlines()[0][:60]})"
    return out


def compile_ms(engine, schemas: list[dict]) -> float:
    """Median ms from a schema to a matcher ready for its first mask."""
    times = []
    for schema in schemas:
        started = time.perf_counter()
        engine.matcher(engine.compile(schema))
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def mask_ms(engine, schemas: list[dict], vocab_size: int, eos: int, seed: int = 0) -> tuple[float, float, int]:
    """Median ms to fill 16 rows' bitmasks once (one decode step), each row walking its own schema by random
    allowed tokens; a finished row starts its schema again."""
    rng = random.Random(seed)
    compiled = [engine.compile(s) for s in schemas[:ROWS]]
    matchers = [engine.matcher(c) for c in compiled]
    bitmask = torch.full((ROWS, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    allowed_bits = torch.arange(32, dtype=torch.int32)
    times, allowed_counts, restarts = [], [], 0
    for _ in range(STEPS):
        started = time.perf_counter()
        for row, matcher in enumerate(matchers):
            engine.fill(matcher, bitmask, row)
        times.append(time.perf_counter() - started)
        allowed = ((bitmask[:, :, None] >> allowed_bits) & 1).bool().flatten(1)[:, :vocab_size]
        for row in range(ROWS):
            choices = allowed[row].nonzero().flatten().tolist()
            allowed_counts.append(len(choices))
            token = rng.choice(choices)
            if token == eos or not engine.accept(matchers[row], token):
                matchers[row] = engine.matcher(compiled[row])
                restarts += 1
    return 1000 * statistics.median(times), statistics.mean(allowed_counts), restarts


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(ROOT / "benchmarks/results/grammar_vocab")
    vocab, _ = token_bytes(tokenizer)
    eos = tokenizer.eos_id
    schemas = random_schemas(64, seed=1)
    print(f"vocabulary {len(vocab)}, {ROWS} rows, {len(schemas)} random schemas (tests/json_schemas.py)")
    engines = []
    for cls in (XGrammar, LLGuidance):
        started = time.perf_counter()
        engine = cls(vocab, eos, tokenizer.encode)
        engines.append((engine, time.perf_counter() - started))
    covered = {e.name: coverage(e) for e, _ in engines}
    print(f"{'feature':28}" + "".join(f"{e.name:40}" for e, _ in engines))
    for feature in FEATURES:
        print(f"{feature:28}" + "".join(f"{covered[e.name][feature]:40}" for e, _ in engines))
    print(f"{'':28}" + "".join(f"{sum(v == 'yes' for v in covered[e.name].values())}/{len(FEATURES)} features"
                               .ljust(40) for e, _ in engines))
    for engine, setup in engines:
        mask, allowed, restarts = mask_ms(engine, schemas, len(vocab), eos)
        compiled = compile_ms(engine, schemas)
        print(f"{engine.name}: tokenizer set-up {setup * 1000:.0f} ms, schema to matcher {compiled:.2f} ms "
              f"(median), mask {mask:.3f} ms a step of {ROWS} rows (median of {STEPS} steps; "
              f"{allowed:.0f} tokens allowed a row on average, {restarts} rows finished and restarted)")


if __name__ == "__main__":
    main()
