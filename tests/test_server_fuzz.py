"""Hundreds of bad bodies, generated from the schemas: each gets a 4xx with a JSON message, and the server
still answers a good request afterwards."""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetgen.conf.schema import MAX_SENTENCES
from fleetgen.model.serve.request_schemas import CompletionRequest, GenerateRequest
from tests.server_fixtures import MODEL, build_tiny_checkpoint, serving

TOO_LONG = "word " * 300  # more tokens than the 128-token context window
NOT_BOOL = st.one_of(st.integers(), st.text(max_size=5), st.none(), st.floats(allow_nan=False))
NOT_INT = st.one_of(st.floats(allow_nan=False), st.text(max_size=5), st.booleans(),  # strict: 5.0 is no int
                    st.lists(st.integers(), max_size=2))
NOT_NUMBER = st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.lists(st.floats(), max_size=2))
NOT_STRINGS = st.one_of(st.text(max_size=5), st.integers(), st.lists(st.integers(), min_size=1, max_size=3),
                        st.lists(st.none(), min_size=1, max_size=2))

GOOD_NEMO = {
    "sentences": st.lists(st.text(min_size=1, max_size=20).filter(str.strip), min_size=1, max_size=3),
    "tokens_to_generate": st.integers(1, 3),
    "temperature": st.floats(0.1, 100),
    "add_BOS": st.booleans(),
    "top_k": st.integers(0, 1000),
    "top_p": st.floats(0, 1),
    "greedy": st.booleans(),
    "repetition_penalty": st.floats(1, 10),
    "min_tokens_to_generate": st.integers(0, 5),
    "end_strings": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "random_seed": st.one_of(st.none(), st.integers(0, 2 ** 32)),
}
BAD_NEMO = {
    "sentences": st.one_of(NOT_STRINGS, st.just([]), st.just(["a"] * 129), st.just([TOO_LONG]), st.just([""])),
    "tokens_to_generate": st.one_of(st.integers(max_value=0), st.integers(200, 10 ** 30), NOT_INT, st.none()),
    "temperature": st.one_of(st.floats(max_value=0), st.floats(min_value=100.001), NOT_NUMBER),
    "add_BOS": NOT_BOOL,
    "top_k": st.one_of(st.integers(max_value=-1), NOT_INT, st.none()),
    "top_p": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.000001), NOT_NUMBER),
    "greedy": NOT_BOOL,
    "all_probs": NOT_BOOL,
    "repetition_penalty": st.one_of(st.floats(max_value=0.999), NOT_NUMBER),
    "min_tokens_to_generate": st.one_of(st.integers(max_value=-1), NOT_INT, st.none()),
    "end_strings": st.one_of(NOT_STRINGS, st.just([""])),
    "compute_logprob": NOT_BOOL,
    "random_seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2 ** 63), NOT_INT),
}
BAD_COMPLETION = {
    "model": st.one_of(st.integers(), st.none(), st.text(max_size=8).filter(lambda m: m != MODEL)),
    "prompt": st.one_of(st.integers(), st.just([]), st.just(TOO_LONG), st.just(""),
                        st.lists(st.integers(), min_size=1, max_size=2)),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(200, 10 ** 9), NOT_INT),
    "temperature": st.one_of(st.floats(max_value=-1e-9), NOT_NUMBER),
    "top_p": st.one_of(st.floats(min_value=1.000001), NOT_NUMBER),
    "n": st.one_of(st.integers(max_value=0), st.integers(MAX_SENTENCES + 1, 10 ** 6)),  # 2..128 are served
    "logprobs": st.one_of(st.integers(max_value=-1), st.integers(min_value=6)),
    "stop": st.one_of(st.just(""), st.lists(st.integers(), min_size=1, max_size=2)),
    "echo": NOT_BOOL.filter(lambda v: v is not None),  # OpenAI's echo and stream may be null
    "stream": NOT_BOOL.filter(lambda v: v is not None),
}
UNKNOWN = st.text(min_size=1, max_size=12).filter(
    lambda k: k not in GenerateRequest.model_fields and k not in CompletionRequest.model_fields)


@st.composite
def broken_objects(draw, good: dict, bad: dict) -> bytes:
    """Some good fields plus at least one bad one, and maybe an unknown key."""
    fields = {k: draw(v) for k, v in good.items() if draw(st.booleans())}
    broken = draw(st.lists(st.sampled_from(sorted(bad)), min_size=1, max_size=3, unique=True))
    fields.update({k: draw(bad[k]) for k in broken})
    if draw(st.booleans()):
        fields[draw(UNKNOWN)] = draw(st.integers())
    return json.dumps(fields).encode()


def bad_bodies(good: dict, bad: dict) -> st.SearchStrategy[bytes]:
    """Broken objects; JSON that is not an object; bytes that are (mostly) not JSON."""
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                               lambda inner: st.lists(inner, max_size=3), max_leaves=5)
    return st.one_of(broken_objects(good, bad), json_values.map(lambda v: json.dumps(v).encode()),
                     st.binary(max_size=40))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serving(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))) as served:
        with httpx.Client(base_url=served.url, timeout=60) as client:
            yield served, client


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=bad_bodies(GOOD_NEMO, BAD_NEMO))
def test_bad_generate_bodies_get_a_4xx_json_error(served, body):
    _, client = served
    response = client.put("/generate", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, (body, response.text)
    assert isinstance(response.json()["error"], str) and response.json()["error"]


@settings(FUZZ, max_examples=150)
@given(body=bad_bodies({"model": st.just(MODEL), "prompt": st.just("a"), "max_tokens": st.integers(1, 3)},
                       BAD_COMPLETION))
def test_bad_completion_bodies_get_a_4xx_openai_error(served, body):
    _, client = served
    response = client.post("/v1/completions", content=body)
    assert 400 <= response.status_code < 500, (body, response.text)
    assert isinstance(response.json()["error"]["message"], str)


def test_after_the_fuzzing_the_server_is_healthy_and_answers(served):
    server, client = served
    assert client.get("/health").json()["status"] == "ready"
    answer = client.put("/generate", json={"sentences": ["import re", "x"], "tokens_to_generate": 3, "greedy": True})
    assert answer.status_code == 200 and len(answer.json()["sentences"]) == 2
    completion = client.post("/v1/completions", json={"model": MODEL, "prompt": "import", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] >= 1
    assert server.engine.error is None and server.engine.running
    blocks = server.engine.blocks  # every answered request gave its KV-cache blocks back
    assert not blocks.tables and blocks.free_blocks == len(blocks.blocks)
