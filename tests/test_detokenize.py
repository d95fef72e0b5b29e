"""The text of tokens (model/serve/detokenize.py): strings and offsets, incremental text, completion text."""
import pytest

from fleetgen.model.serve.detokenize import CompletionText, IncrementalText, token_spans
from tests.server_fixtures import EOT


TEXTS = ["It is a truth universally acknowledged.", "  Café, naïve — déjà vu.\n\n東京 😀 🚀 ½",
         f"First.{EOT}Second", "x"]


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
