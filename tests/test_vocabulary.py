"""Each token's bytes (model/serve/vocabulary.py), what the grammar engine matches: a text's tokens' bytes put
together are the text's UTF-8, for byte-level BPE and for SentencePiece (spaces as "▁", bytes as <0xNN>)."""
import pytest

from fleetgen.model.serve.vocabulary import token_bytes

TEXTS = ["def encode(self, o):", "Café, naïve — 東京 😀", '{"a": [1, 2.5, null]}', "  two  spaces\nand a line"]


@pytest.mark.parametrize("name", ["bpe", "sentencepiece"])
def test_the_bytes_of_a_texts_tokens_are_its_utf8(request, name):
    tokenizer = request.getfixturevalue(name)
    tokens, special = token_bytes(tokenizer)
    assert len(tokens) == tokenizer.vocab_size and tokenizer.eos_id in special and tokens[tokenizer.eos_id] == b""
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text or name == "sentencepiece"  # SentencePiece may drop a leading space
        assert b"".join(tokens[i] for i in ids).decode().lstrip(" ") == tokenizer.decode(ids).lstrip(" ")
