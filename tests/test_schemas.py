"""Request schemas, their error messages, stop conditions and the text of tokens (no model needed)."""
import io
from types import SimpleNamespace

import pytest

from fleetgen.model.serve.api import (CompletionRequest, CompletionText, GenerateRequest, IncrementalText, RequestError,
                                check_prompt, nemo_stop, parse, read_json, token_spans)
from fleetgen.model.tokenizer import SentencePieceTokenizer, load_tokenizer
from tests.server_fixtures import CORPUS, EOT, build_tiny_checkpoint

TEXTS = ["It is a truth universally acknowledged.", "  Café, naïve — déjà vu.\n\n東京 😀 🚀 ½",
         f"First.{EOT}Second", "x"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return load_tokenizer(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter("".join(CORPUS).splitlines()), model_writer=model,
                                   vocab_size=600, character_coverage=1.0, byte_fallback=True,
                                   minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


def test_generate_defaults_are_nemos():
    request = parse(GenerateRequest, {"sentences": ["a"]})
    assert request.model_dump(exclude={"sentences", "task_ids", "neighbors"}) == {
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
    ("max_tokens", 5, "unknown field 'max_tokens'; valid fields: sentences, tokens_to_generate"),
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
                        ({"model": "m", "prompt": "a", "n": 2}, "n: Input should be less than or equal to 1"),
                        ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs: Input should be less than"),
                        ({"prompt": "a"}, "model: required field missing"),
                        ({"model": "m", "prompt": "a", "best_of": 2}, "unknown field 'best_of'")]:
        with pytest.raises(RequestError, match=words):
            parse(CompletionRequest, body)


def test_end_strings_become_stop_tokens_or_stop_texts(bpe):
    eos = bpe.eos_id
    stop = nemo_stop([EOT, "\n", "endoftext was not a token"], bpe, eos)
    newline = bpe.encode("\n")
    assert len(newline) == 1
    assert stop.token_ids == {eos, newline[0]}
    assert stop.strings == ("\n", "endoftext was not a token")  # EOT is the end-of-document token itself
    assert nemo_stop([], bpe, eos).token_ids == {eos}  # as in NeMo, end-of-document always ends a sequence


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


@pytest.mark.parametrize("which", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("text", TEXTS)
def test_token_strings_and_offsets_tile_the_decoded_text(request, which, text):
    tokenizer = request.getfixturevalue(which)
    ids = tokenizer.encode(text)
    pieces, offsets, decoded = token_spans(tokenizer, ids)
    assert decoded == tokenizer.decode(ids)
    assert len(pieces) == len(offsets) == len(ids) and offsets[0] == 0
    assert offsets == sorted(offsets) and all(p for p in pieces)
    for piece, start, end in zip(pieces, offsets, offsets[1:] + [len(decoded)]):
        assert decoded[start:end] in ("", piece)  # a token adding no text shows its vocabulary piece


def test_an_added_bos_takes_no_room_in_the_text(bpe):
    ids = [bpe.bos_id] + bpe.encode("hello")
    pieces, offsets, text = token_spans(bpe, ids, hidden=1)
    assert (pieces[0], offsets[:2], text) == (EOT, [0, 0], "hello")


@pytest.mark.parametrize("which", ["bpe", "sentencepiece"])
def test_incremental_text_after_a_prompt_is_the_decoded_continuation(request, which):
    tokenizer = request.getfixturevalue(which)
    prompt, rest = tokenizer.encode("Grüße aus"), tokenizer.encode(" 東京, déjà vu 😀 and more words")
    text = IncrementalText(tokenizer, prompt)
    added = "".join(text.add(t) for t in rest) + text.flush()
    assert tokenizer.decode(prompt) + added == tokenizer.decode(prompt + rest)


def test_completion_text_holds_back_a_possible_stop_string_and_cuts_before_it(bpe):
    ids = bpe.encode("value = 1\nSTOP here")
    text = CompletionText(bpe, bpe.encode("x"), ["\nSTOP"], bpe.eos_id)
    released = [text.add(t) for t in ids]
    released.append(text.finish())
    assert "".join(released) == "value = 1" == text.text
    assert all("\n" not in part for part in released)


def test_completion_text_leaves_out_the_end_of_document_token(bpe):
    text = CompletionText(bpe, bpe.encode("x"), [], bpe.eos_id)
    shown = [text.add(t) for t in bpe.encode("abc") + [bpe.eos_id]] + [text.finish()]
    assert "".join(shown) == "abc"
