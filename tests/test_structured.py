"""Structured output through the real engine: every constrained output parses and validates against its
schema (many random schemas, tests/json_schemas.py, greedy and sampled), regex, choice and grammar constraints,
the requests' fields (OpenAI's response_format, vLLM's guided_*, NeMo's and batch records' json_schema) and
their 400s. The model is recipes/data's tiny GPT-2: a real English model with a 512-token context."""
import json
import re

import jsonschema
import openai
import pytest
import requests

from fleetgen.conf.schema import Generation
from fleetgen.launcher.batch.formats import FleetgenFormat
from fleetgen.launcher.config import DATA_DIR
from fleetgen.launcher.errors import LaunchError
from fleetgen.model import constraints
from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve.engine import Engine, Sampling, SequenceRequest
from fleetgen.model.serve.kv_blocks import BlockManager
from fleetgen.model.serve.scheduler import ScheduledStep, Scheduler, SequenceState
from tests.json_schemas import random_schemas
from tests.server_fixtures import MODEL, make_engine, serving

TINY = DATA_DIR / "tiny-gpt2"
PROMPT = "Her answer, as JSON:"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def served():
    with serving(TINY, max_batch=16, max_seq_len=512) as served:
        yield served


def text_of(engine: Engine, tokens: list[int]) -> str:
    return engine.tokenizer.decode([t for t in tokens if t != engine.eos_id])


def test_every_constrained_output_parses_and_validates_over_many_random_schemas(served):
    engine, schemas = served.engine, random_schemas(160, seed=7)
    prompt = tuple(engine.tokenizer.encode(PROMPT))
    futures = [engine.submit(SequenceRequest(prompt, 300, Sampling(greedy=True) if i % 2 else Sampling(seed=i),
                                             constraint=constraints.json_schema(schema)))
               for i, schema in enumerate(schemas)]
    for schema, future in zip(schemas, futures):
        result = future.result(300)
        assert result.finish_reason == "stop", (schema, text_of(engine, result.tokens))
        jsonschema.validate(json.loads(text_of(engine, result.tokens)), schema)


def test_unconstrained_the_model_writes_no_json(served):
    """The check above is not vacuous: the same model left alone writes English."""
    engine = served.engine
    result = engine.submit(SequenceRequest(tuple(engine.tokenizer.encode(PROMPT)), 40, Sampling(greedy=True)))
    with pytest.raises(ValueError):
        json.loads(text_of(engine, result.result(60).tokens))


def test_regex_choice_and_grammar_constrain_completions(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none")

    def complete(**extra):
        answer = client.completions.create(model=MODEL, prompt="She said", max_tokens=60, temperature=0.8, seed=1,
                                           extra_body=extra)
        assert answer.choices[0].finish_reason == "stop"
        return answer.choices[0].text
    assert re.fullmatch(r"[a-z]{3,6}-[0-9]{2}", complete(guided_regex=r"[a-z]{3,6}-[0-9]{2}"))
    assert complete(guided_choice=["yes", "no", "perhaps not"]) in {"yes", "no", "perhaps not"}
    lark = 'start: "(" item ("," item)? ("," item)? ")"\nitem: /[0-9]{1,2}/'  # bounded: it must end
    assert re.fullmatch(r"\(\d{1,2}(,\d{1,2}){0,2}\)", complete(guided_grammar=lark))


def test_response_format_json_schema_json_object_and_guided_json(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none")
    formats = [{"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "person", "schema": PERSON, "strict": True}}},
               {"guided_json": PERSON}, {"guided_json": json.dumps(PERSON)}]
    for extra in formats:
        for temperature in (0, 1):
            answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100, temperature=temperature,
                                               seed=3, extra_body=extra)
            jsonschema.validate(json.loads(answer.choices[0].text), PERSON)
    # any object: the Austen model writes prose in its strings until the budget ends, every token allowed
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                       extra_body={"response_format": {"type": "json_object"}})
    text = answer.choices[0].text
    any_object = constraints.json_schema({"type": "object"})
    matcher, fresh = served.engine.grammars.matcher(any_object), served.engine.grammars.matcher(any_object)
    assert text.startswith("{") and matcher.consume_tokens(served.engine.tokenizer.encode(text))
    assert not fresh.consume_tokens(served.engine.tokenizer.encode("]{"))  # the matcher does check
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                      extra_body={"response_format": {"type": "text"}})
    assert plain.choices[0].finish_reason == "length"


@pytest.mark.parametrize("extra, words", [
    ({"guided_json": {"type": "object", "not": {"required": ["a"]}}}, 'guided_json: Unimplemented keys: \\["not"\\]'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                         "uniqueItems": True}}}},
     "response_format: .*uniqueItems"),
    ({"guided_regex": "[a-z"}, "guided_regex: .*unclosed character class"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar: .*undefined_rule"),
    ({"guided_choice": []}, "guided_choice: a choice is a non-empty list"),
    ({"guided_json": "{not json"}, "guided_json: not a JSON schema"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex, guided_choice: give at most one"),
    ({"response_format": {"type": "json_schema"}}, "response_format: type json_schema needs a json_schema"),
])
def test_a_constraint_that_cannot_be_compiled_is_a_400_naming_the_field_and_why(served, extra, words):
    response = requests.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": "a", **extra})
    assert response.status_code == 400
    assert re.search(words, response.json()["error"]["message"], re.DOTALL), response.text


def test_nemo_generate_takes_a_json_schema(served):
    body = {"sentences": [PROMPT, "Another:"], "tokens_to_generate": 100, "greedy": True, "json_schema": PERSON}
    answer = requests.put(f"{served.url}/generate", json=body).json()
    for sentence, prompt in zip(answer["sentences"], body["sentences"]):
        jsonschema.validate(json.loads(sentence[len(prompt):].replace("<|endoftext|>", "")), PERSON)
    bad = requests.put(f"{served.url}/generate", json={**body, "json_schema": {"not": {}}})
    assert bad.status_code == 400 and "json_schema" in bad.text and "not" in bad.text


def test_a_batch_record_with_a_schema_that_cannot_compile_fails_validation_naming_line_and_field(tmp_path):
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    defaults = Generation(json_schema=str(schema_file))  # generation.json_schema=PATH for the whole batch
    assert defaults.json_schema == PERSON
    records = FleetgenFormat(defaults, batch_seed=0)
    record, _ = records.parse({"prompt": "p"}, 0, 1, "in.jsonl:1")
    assert record.params["json_schema"] == PERSON
    own, _ = records.parse({"prompt": "p", "json_schema": {"type": "array"}}, 1, 2, "in.jsonl:2")
    assert own.params["json_schema"] == {"type": "array"}
    with pytest.raises(LaunchError, match=r'in.jsonl:3: field json_schema: .*Unimplemented keys: \["if", "then"\]'):
        records.parse({"prompt": "p", "json_schema": {"if": {}, "then": {}}}, 2, 3, "in.jsonl:3")
    with pytest.raises(LaunchError, match="in.jsonl:4: field json_schema: .*missing.json: cannot read"):
        records.parse({"prompt": "p", "json_schema": str(tmp_path / "missing.json")}, 3, 4, "in.jsonl:4")


def test_a_constrained_sequence_is_never_decoded_ahead():
    """Run-ahead decode feeds a token before it is known; a grammar's mask needs it first."""
    scheduler = Scheduler([range(0, 2)], 100, BlockManager(num_blocks=4, block_size=4))
    request = SequenceRequest((1, 2), 10)
    for constrained in (False, True):
        scheduler.clear()
        sequence = SequenceState(request, None, grammar=object() if constrained else None, slot=0, tokens=[5])
        scheduler.active[0] = sequence
        scheduler.blocks.admit(sequence, sequence.context, 3)
        step = ScheduledStep("decode", 0, [sequence], [[5]], [2])
        assert (scheduler.decode_after(step) is None) == constrained


def test_constrained_rows_are_right_beside_others_with_run_ahead_and_decode_graphs_on():
    """The GPU's serving path as it runs on a CPU: decode steps fed ahead, through the bucketed graph steps."""
    engine = make_engine(TINY, ParallelState.single(), max_batch=4, max_seq_len=512, graphs=True)
    engine.run_ahead = True
    engine.warm_up()
    engine.start()
    try:
        prompt = tuple(engine.tokenizer.encode(PROMPT))
        free = engine.submit(SequenceRequest(prompt, 30, Sampling(greedy=True)))
        bound = engine.submit(SequenceRequest(prompt, 100, Sampling(greedy=True),
                                              constraint=constraints.json_schema(PERSON)))
        jsonschema.validate(json.loads(text_of(engine, bound.result(120).tokens)), PERSON)
        alone = engine.submit(SequenceRequest(prompt, 30, Sampling(greedy=True)))
        assert free.result(120).tokens == alone.result(120).tokens
    finally:
        engine.stop()


@pytest.mark.slow
@pytest.mark.parametrize("tensor, pipeline", [(2, 1), (1, 2)])
def test_a_constrained_request_gives_the_same_tokens_over_tensor_or_pipeline_ranks(tmp_path, tensor, pipeline):
    """The mask travels with the plan to the output rank (protocol.py): every rank runs the same steps."""
    from tests import test_server_multirank as multirank

    bodies = [{"sentences": [PROMPT, "Another:"], "tokens_to_generate": 60, "json_schema": PERSON, **sampling}
              for sampling in ({"greedy": True}, {"random_seed": 11, "top_k": 20})]
    with serving(TINY) as alone:
        expected = [requests.put(f"{alone.url}/generate", json=body).json()["token_ids"] for body in bodies]
        tokenizer, eos = alone.engine.tokenizer, alone.engine.eos_id
    replica = multirank.Replica(TINY, tensor, pipeline, tmp_path / "port")
    url = replica.url()
    try:
        got = [requests.put(f"{url}/generate", json=body).json()["token_ids"] for body in bodies]
    finally:
        requests.post(f"{url}/shutdown")
        replica.thread.join(120)
    assert got == expected
    for answer in got:
        for ids, sentence in zip(answer, bodies[0]["sentences"]):
            generated = ids[len(tokenizer.encode(sentence)):]
            jsonschema.validate(json.loads(tokenizer.decode([t for t in generated if t != eos])), PERSON)
