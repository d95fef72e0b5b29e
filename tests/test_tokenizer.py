import json

import pytest
import sentencepiece
from tokenizers import ByteLevelBPETokenizer
from tokenizers import Tokenizer as HFTokenizer

from fleetgen.model.checkpoint.source import CheckpointError
from fleetgen.model.tokenizer import load_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "  two  spaces, tabs\tand\nnewlines ", "zebras 123 ÄÖÜ ✓",
         ""]


def test_sentencepiece_matches_the_library(sp_model):
    tok = load_tokenizer(sp_model)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.vocab_size == sp.get_piece_size() == 100
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)
    ids = tok.encode("the lazy dog")
    assert [tok.id_to_piece(i) for i in ids] == [sp.id_to_piece(i) for i in ids]
    assert tok.decode(tok.encode("the lazy dog jumps")) == "the lazy dog jumps"


def test_sentencepiece_from_a_directory_with_overridden_ids(sp_model):
    tok = load_tokenizer(sp_model.parent, bos_id=7, eos_id=8, pad_id=9)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (7, 8, 9)
    assert tok.encode("quick fox") == sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).encode("quick fox")


def test_gpt2_vocab_and_merges_match_the_library(bpe_dir):
    tok = load_tokenizer(bpe_dir / "vocab.json")
    ref = ByteLevelBPETokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"))
    assert tok.vocab_size == ref.get_vocab_size() == 320
    eod = ref.token_to_id("<|endoftext|>")
    assert tok.bos_id == tok.eos_id == eod and tok.pad_id is None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids
        assert tok.decode(ids) == text  # byte-level BPE round-trips any text exactly
    assert tok.id_to_piece(tok.encode(" lazy")[0]).startswith("Ġ")
    # GPT-2's end-of-text marker is one special token inside text, as in GPT-2's own tokenizer
    assert tok.encode("dog<|endoftext|>") == tok.encode("dog") + [eod]


def test_tokenizer_json_matches_the_library(bpe_dir):
    tok = load_tokenizer(bpe_dir / "tokenizer.json")
    ref = HFTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    assert tok.vocab_size == ref.get_vocab_size()
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == ref.token_to_id("<|endoftext|>")


def test_a_directory_prefers_tokenizer_json(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok.path.name == "tokenizer.json"
    assert tok.encode("seven wizards") == load_tokenizer(bpe_dir / "vocab.json").encode("seven wizards")


def test_tokenizer_config_json_names_the_special_tokens(bpe_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    vocab = json.loads((bpe_dir / "vocab.json").read_text())
    first, second = sorted(vocab, key=vocab.get)[-2:]
    config = {"bos_token": first, "eos_token": {"content": second, "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path / "vocab.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab[first], vocab[second], None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(CheckpointError, match="tokenizer_config.json: pad_token '<pad>' is not in the vocabulary"):
        load_tokenizer(tmp_path / "vocab.json")


def test_missing_and_ambiguous_tokenizers_are_errors(tmp_path, sp_model):
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="nothing.model: tokenizer file not found"):
        load_tokenizer(tmp_path / "nothing.model")
    for name in ("a.model", "b.model"):
        (tmp_path / name).write_bytes(sp_model.read_bytes())
    with pytest.raises(CheckpointError, match="several SentencePiece models"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="merges.txt: file not found"):
        load_tokenizer(tmp_path / "vocab.json")


def test_a_corrupt_sentencepiece_model_is_an_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="bad.model: not a SentencePiece model"):
        load_tokenizer(bad)
