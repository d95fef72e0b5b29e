"""The two formats on their own (no server, no files): the items and seeds a record makes, which items share a
request, the request body, the tokens asked for, and the records an answer or a failure becomes."""
import pytest

from fleetgen.conf.schema import Generation
from fleetgen.launcher.batch.formats import FleetgenFormat, Item, OpenAIFormat, Record
from fleetgen.launcher.batch.keys import base_seed
from fleetgen.launcher.errors import LaunchError

BATCH_SEED = 7


def fleetgen(**defaults) -> FleetgenFormat:
    return FleetgenFormat(Generation(**defaults), BATCH_SEED)


def parsed(fmt, obj, line=1) -> Record:
    record, _ = fmt.parse(obj, line - 1, line, f"in.jsonl, line {line}")
    return record


# ---- fleetgen's format

def test_a_record_without_fields_of_its_own_takes_the_defaults_and_its_own_fields_win():
    fmt = fleetgen(tokens_to_generate=9)
    plain, own = parsed(fmt, {"prompt": "a"}), parsed(fmt, {"prompt": "b", "top_k": 3, "id": "x"}, line=2)
    assert plain.params == Generation(tokens_to_generate=9).model_dump() and plain.key == 1
    assert own.params == Generation(tokens_to_generate=9, top_k=3).model_dump() and own.key == "x"


@pytest.mark.parametrize("obj, fragment", [
    (["prompt"], "expected a JSON object with a \"prompt\", got list"),
    ({"prompt": 3}, '"prompt" must be a non-empty string'),
    ({"prompt": "x", "id": None}, '"id" must be a string or an integer, got None'),
    ({"prompt": "x", "id": [1]}, '"id" must be a string or an integer, got [1]'),
    ({"prompt": "x", "top_k": -1}, "field top_k: "),
    ({"prompt": "x", "top_p": 2, "top_k": -1}, "field top_k: "),  # the first bad field in the schema's order
])
def test_a_bad_fleetgen_record_is_refused_naming_its_line(obj, fragment):
    with pytest.raises(LaunchError) as refused:
        parsed(fleetgen(), obj, line=4)
    assert str(refused.value).startswith("in.jsonl, line 4: ") and fragment in str(refused.value)


def test_whether_a_record_gave_an_id_is_reported():
    fmt = fleetgen()
    assert fmt.parse({"prompt": "a", "id": 0}, 0, 1, "w")[1] is True
    assert fmt.parse({"prompt": "a"}, 0, 1, "w")[1] is False


def test_greedy_samples_are_unseeded_and_sampled_ones_count_up_from_the_records_base_seed():
    greedy = fleetgen(greedy=True)
    assert [(i.sample, i.seed) for i in greedy.items(parsed(greedy, {"prompt": "a"}), 3)] == \
        [(0, None), (1, None), (2, None)]
    sampled = fleetgen()
    record = parsed(sampled, {"prompt": "a", "id": "k"})
    base = base_seed(BATCH_SEED, "k")
    assert [(i.sample, i.seed) for i in sampled.items(record, 3)] == [(0, base), (1, base + 1), (2, base + 2)]
    own = parsed(sampled, {"prompt": "a", "random_seed": 0})  # 0 is a seed like any other
    assert [i.seed for i in sampled.items(own, 2)] == [0, 1]


def test_greedy_items_share_a_request_when_their_settings_are_equal():
    fmt = fleetgen(greedy=True)
    a, b, c = (fmt.items(parsed(fmt, obj, n), 1)[0] for n, obj in
               enumerate([{"prompt": "a"}, {"prompt": "b", "top_k": 0}, {"prompt": "c", "top_k": 2}], 1))
    assert fmt.can_share(a, a, b)  # equal settings, though b's are its own
    assert not fmt.can_share(a, b, c)


def test_sampled_items_share_a_request_only_as_consecutive_samples_of_one_record():
    fmt = fleetgen()
    r, s = parsed(fmt, {"prompt": "a", "id": 1}), parsed(fmt, {"prompt": "b", "id": 2}, 2)
    r0, r1, r2 = fmt.items(r, 3)
    s0 = fmt.items(s, 1)[0]
    assert fmt.can_share(r0, r0, r1) and fmt.can_share(r0, r1, r2)
    assert not fmt.can_share(r0, r0, r2)  # a gap: r2's seed would be r0's + 1
    assert not fmt.can_share(r0, r0, s0)  # another record's seeds are its own


def test_a_request_carries_every_prompt_and_its_first_items_seed():
    fmt = fleetgen(tokens_to_generate=5)
    items = fmt.items(parsed(fmt, {"prompt": "a", "id": 1}), 2)
    body = fmt.body(items, "any")
    assert body["sentences"] == ["a", "a"] and body["random_seed"] == items[0].seed
    assert {k: v for k, v in body.items() if k not in ("sentences", "random_seed")} == \
        {k: v for k, v in items[0].record.params.items() if k != "random_seed"}
    greedy = fleetgen(greedy=True, random_seed=3)
    assert greedy.body(greedy.items(parsed(greedy, {"prompt": "b"}), 1), "any")["random_seed"] == 3
    assert fmt.tokens_requested(items) == 10


def answer_for(prompts, completions, prompt_tokens, logprob=None):
    """What PUT /generate answers: the whole text, its token ids, and where each token starts."""
    answer = {"sentences": [], "token_ids": [], "offsets": [], "logprob": logprob}
    for prompt, completion, n in zip(prompts, completions, prompt_tokens):
        answer["sentences"].append(prompt + completion)
        answer["token_ids"].append(list(range(n + 2)))
        step = len(prompt) // n
        answer["offsets"].append([step * j for j in range(n)] + [len(prompt), len(prompt) + 1])
    return answer


def test_an_answer_becomes_one_output_record_per_item_with_its_token_counts():
    fmt = fleetgen(greedy=True)
    items = [fmt.items(parsed(fmt, {"prompt": p, "id": p}, n), 1)[0] for n, p in enumerate(["abcd", "efghij"], 1)]
    results = fmt.results(items, answer_for(["abcd", "efghij"], [" x", " y"], [2, 3]))
    assert [(r["id"], r["completion"], r["prompt_tokens"], r["completion_tokens"], *tokens)
            for r, tokens in results] == [("abcd", " x", 2, 2, 2, 2, 0), ("efghij", " y", 3, 2, 3, 2, 0)]
    # the server's cached_tokens: each sentence's prompt tokens found in its KV cache
    cached = fmt.results(items, {**answer_for(["abcd", "efghij"], [" x", " y"], [2, 3]), "cached_tokens": [0, 3]})
    assert [tokens for _, tokens in cached] == [(2, 2, 0), (3, 2, 3)]
    first = results[0][0]
    assert first == {"id": "abcd", "sample": 0, "seed": None, "prompt": "abcd", "completion": " x",
                     "prompt_tokens": 2, "completion_tokens": 2, "params": items[0].record.params}


def test_a_sentence_that_does_not_start_with_its_prompt_is_the_completion_whole():
    fmt = fleetgen(greedy=True)
    [item] = fmt.items(parsed(fmt, {"prompt": "abcd"}), 1)
    answer = answer_for(["abcd"], [" x"], [2])
    answer["sentences"] = ["ABCD x"]  # the detokenised prompt differs from the one sent
    assert fmt.results([item], answer)[0][0]["completion"] == "ABCD x"


def test_logprobs_are_kept_only_when_the_record_asked_and_the_server_gave_them():
    asked = fleetgen(greedy=True, compute_logprob=True)
    [item] = asked.items(parsed(asked, {"prompt": "abcd"}), 1)
    assert asked.results([item], answer_for(["abcd"], [" x"], [2], logprob=[[-0.5]]))[0][0]["logprob"] == [-0.5]
    assert "logprob" not in asked.results([item], answer_for(["abcd"], [" x"], [2]))[0][0]
    plain = fleetgen(greedy=True)
    [item] = plain.items(parsed(plain, {"prompt": "abcd"}), 1)
    assert "logprob" not in plain.results([item], answer_for(["abcd"], [" x"], [2], logprob=[[-0.5]]))[0][0]


def test_a_failed_fleetgen_item_names_its_key_sample_seed_and_line():
    fmt = fleetgen()
    item = fmt.items(parsed(fmt, {"prompt": "a", "id": "k"}, line=3), 2)[1]
    assert fmt.error(item, "HTTP 400: no", 400, {"error": "no"}) == \
        {"id": "k", "sample": 1, "seed": item.seed, "line": 3, "status_code": 400, "error": "HTTP 400: no"}


# ---- OpenAI's batch format

def openai_line(custom_id="req-1", **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Hello", **body}}


@pytest.mark.parametrize("obj, fragment", [
    ("text", "expected a JSON object (OpenAI batch format), got str"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions"}, "; missing body"),
    ({**openai_line(), "extra": 1}, "; unknown extra"),
    ({**openai_line(), "custom_id": 5}, '"custom_id" must be a non-empty string'),
])
def test_a_bad_openai_line_is_refused_naming_its_line(obj, fragment):
    with pytest.raises(LaunchError) as refused:
        parsed(OpenAIFormat(BATCH_SEED), obj, line=2)
    assert str(refused.value).startswith("in.jsonl, line 2: ") and fragment in str(refused.value)


def test_an_openai_request_is_seeded_by_its_body_else_by_the_batch_unless_it_is_greedy():
    fmt = OpenAIFormat(BATCH_SEED)
    seeds = [fmt.items(parsed(fmt, openai_line(f"r{n}", **body)), 1) for n, body in
             enumerate([{"seed": 5}, {}, {"temperature": 0.5}, {"temperature": 0}])]
    assert [[(i.sample, i.seed) for i in items] for items in seeds] == \
        [[(0, 5)], [(0, base_seed(BATCH_SEED, "r1"))], [(0, base_seed(BATCH_SEED, "r2"))], [(0, None)]]


def test_an_openai_request_goes_alone_to_the_served_model_with_its_seed():
    fmt = OpenAIFormat(BATCH_SEED)
    [seeded] = fmt.items(parsed(fmt, openai_line(max_tokens=3)), 1)
    [greedy] = fmt.items(parsed(fmt, openai_line("g", temperature=0)), 1)
    assert not fmt.can_share(seeded, seeded, greedy)
    assert fmt.body([seeded], "tiny") == {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "seed": seeded.seed}
    assert fmt.body([greedy], "tiny") == {"model": "tiny", "prompt": "Hello", "temperature": 0}


@pytest.mark.parametrize("body, tokens", [
    ({}, 16), ({"max_tokens": 5}, 5), ({"max_tokens": 1}, 1), ({"max_tokens": 0}, 16), ({"max_tokens": "9"}, 16),
    ({"max_tokens": 5, "prompt": ["a", "b", "c"]}, 15), ({"max_tokens": 5, "prompt": []}, 5),
])
def test_the_tokens_an_openai_request_asks_for(body, tokens):
    fmt = OpenAIFormat(BATCH_SEED)
    assert fmt.tokens_requested(fmt.items(parsed(fmt, openai_line(**body)), 1)) == tokens


def test_an_openai_answer_becomes_its_batch_output_object():
    fmt = OpenAIFormat(BATCH_SEED)
    items = fmt.items(parsed(fmt, openai_line("req-9")), 1)
    answer = {"id": "cmpl-1", "object": "text_completion", "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    [(record, tokens)] = fmt.results(items, answer)
    assert tokens == (2, 3, 0) and record["id"].startswith("batch_req_")
    assert record == {"id": record["id"], "custom_id": "req-9", "error": None,
                      "response": {"status_code": 200, "request_id": "cmpl-1", "body": answer}}
    [(record, tokens)] = fmt.results(items, {"object": "text_completion"})
    assert tokens == (0, 0, 0) and record["response"]["request_id"].startswith("batch_req_")
    reused = {**answer, "usage": {"prompt_tokens": 40, "completion_tokens": 3,
                                  "prompt_tokens_details": {"cached_tokens": 32}}}
    assert fmt.results(items, reused)[0][1] == (40, 3, 32)


def test_a_failed_openai_request_has_its_answer_in_response_or_else_an_error():
    fmt = OpenAIFormat(BATCH_SEED)
    [item] = fmt.items(parsed(fmt, openai_line("req-2")), 1)
    answered = fmt.error(item, "HTTP 400: bad", 400, {"error": {"message": "bad"}})
    assert answered == {"id": answered["id"], "custom_id": "req-2", "error": None,
                        "response": {"status_code": 400, "request_id": answered["response"]["request_id"],
                                     "body": {"error": {"message": "bad"}}}}
    unanswered = fmt.error(item, "lost", None, None)
    assert unanswered == {"id": unanswered["id"], "custom_id": "req-2", "response": None,
                          "error": {"code": "server_unavailable", "message": "lost"}}


def test_an_item_is_placed_by_its_record_and_sample():
    record = Record(index=4, line=6, key="k", prompt="p", params={})
    assert Item(record, 2, None).position == (4, 2)
