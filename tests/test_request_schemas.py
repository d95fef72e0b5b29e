"""Request schemas and their error messages (model/serve/request_schemas.py), and the generation fields they share with
batch records (conf/schema.py Generation)."""
from types import SimpleNamespace

import pytest

from fleetgen.model.serve.request_schemas import (CompletionRequest, GenerateRequest, RequestError, check_prompt,
                                                  parse, read_json)

def test_generate_defaults_are_nemos():
    request = parse(GenerateRequest, {"sentences": ["a"]})
    assert request.model_dump(exclude={"sentences", "task_ids", "neighbors", "truncate_prompt_tokens",
                                       "json_schema"}) == {
        "tokens_to_generate": 64, "temperature": 1.0, "add_BOS": False, "top_k": 0, "top_p": 0.9,
        "greedy": False, "all_probs": False, "repetition_penalty": 1.0, "min_tokens_to_generate": 0,
        "end_strings": ["<|endoftext|>"], "compute_logprob": False, "random_seed": None}


def test_nemo_only_fields_are_accepted_and_ints_pass_as_floats():
    request = parse(GenerateRequest, {"sentences": ["a"], "task_ids": [0], "neighbors": 2, "temperature": 1,
                                      "top_p": 1, "repetition_penalty": 2})
    assert (request.temperature, request.top_p, request.repetition_penalty) == (1.0, 1.0, 2.0)


@pytest.mark.parametrize("field, value, words", [
    ("sentences", [], "sentences: List should have at least 1 item"),
    ("sentences", ["a"] * 129, "sentences: List should have at most 128 items"),
    ("sentences", "a single string", "sentences: Input should be a valid list"),
    ("sentences", ["a", 3], "sentences.1: Input should be a valid string"),
    ("tokens_to_generate", 0, "tokens_to_generate: Input should be greater than or equal to 1"),
    ("tokens_to_generate", 5.0, "tokens_to_generate: Input should be a valid integer"),
    ("tokens_to_generate", True, "tokens_to_generate: Input should be a valid integer"),
    ("temperature", 0, "temperature: Input should be greater than 0"),
    ("temperature", 100.5, "temperature: Input should be less than or equal to 100"),
    ("temperature", "1.0", "temperature: Input should be a valid number"),
    ("top_k", -1, "top_k: Input should be greater than or equal to 0"),
    ("top_p", 1.5, "top_p: Input should be less than or equal to 1"),
    ("greedy", "true", "greedy: Input should be a valid boolean"),
    ("greedy", 1, "greedy: Input should be a valid boolean"),
    ("repetition_penalty", 0.5, "repetition_penalty: Input should be greater than or equal to 1"),
    ("min_tokens_to_generate", -2, "min_tokens_to_generate: Input should be greater than or equal to 0"),
    ("end_strings", "<|endoftext|>", "end_strings: Input should be a valid list"),
    ("random_seed", -1, "random_seed: Input should be greater than or equal to 0"),
    ("compute_logprob", None, "compute_logprob: Input should be a valid boolean"),
    ("max_tokens", 5, "unknown field 'max_tokens'; valid fields: tokens_to_generate, temperature"),
])
def test_each_bad_field_is_a_400_naming_it(field, value, words):
    with pytest.raises(RequestError) as caught:
        parse(GenerateRequest, {"sentences": ["a"], field: value})
    assert caught.value.status == 400 and words in caught.value.message


def test_missing_sentences_and_non_objects_are_400s():
    with pytest.raises(RequestError, match="sentences: required field missing"):
        parse(GenerateRequest, {"tokens_to_generate": 3})
    with pytest.raises(RequestError, match="body must be a JSON object, got list"):
        parse(GenerateRequest, [{"sentences": ["a"]}])


@pytest.mark.parametrize("body, words", [
    (b'{"sentences": ["a"', "body is not valid JSON"),
    (b'{"sentences": ["a"], "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"top_p": Infinity}', "Infinity is not a JSON number"),
    (b"[" * 100000, "nested too deeply"),
    (b'{"sentences": ["\xff\xfe"]}', "body is not valid JSON"),
    (b"", "body is not valid JSON"),
])
def test_malformed_bodies_are_400s(body, words):
    with pytest.raises(RequestError) as caught:
        read_json(body)
    assert caught.value.status == 400 and words in caught.value.message


def test_completion_request_checks_openai_fields():
    request = parse(CompletionRequest, {"model": "m", "prompt": "hi", "stop": "\n"})
    assert (request.prompts, request.stops, request.max_tokens, request.n) == (["hi"], ["\n"], 16, 1)
    for body, words in [({"model": "m", "prompt": []}, "prompt: the list of prompts is empty"),
                        ({"model": "m", "prompt": ["a"] * 65, "n": 2}, "at most 128 completions per request"),
                        ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs: Input should be less than"),
                        ({"prompt": "a"}, "model: required field missing"),
                        ({"model": "m", "prompt": "a", "best_of": 2}, "best_of: 2 cannot be honoured"),
                        ({"model": "m", "prompt": "a", "suffix": "z"}, "suffix: 'z' cannot be honoured"),
                        ({"model": "m", "prompt": "a", "stream_options": {}}, "stream_options: only with stream"),
                        ({"model": "m", "prompt": "a", "bogus": 1}, "unknown field 'bogus'")]:
        with pytest.raises(RequestError, match=words):
            parse(CompletionRequest, body)


def test_prompt_checks_name_the_sentence_and_the_lengths():
    limits = SimpleNamespace(max_seq_len=16, vocab_size=100)
    check_prompt([1] * 10, "sentences[0]", 6, "tokens_to_generate", limits)
    with pytest.raises(RequestError, match=r"sentences\[2\] is 10 tokens; with tokens_to_generate=7 that makes "
                                           r"17, more than the context window of 16 tokens"):
        check_prompt([1] * 10, "sentences[2]", 7, "tokens_to_generate", limits)
    with pytest.raises(RequestError, match=r"prompt is empty"):
        check_prompt([], "prompt", 1, "max_tokens", limits)
    with pytest.raises(RequestError, match="token id 100 is outside the model's vocabulary of 100"):
        check_prompt([5, 100], "prompt", 1, "max_tokens", limits)
