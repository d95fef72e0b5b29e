"""Module-scoped fixtures: the tiny SentencePiece model and GPT-2 byte-level BPE the checkpoint tests share."""
import pytest

from tests.checkpoint_writers import train_gpt2_bpe, train_sentencepiece


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_gpt2_bpe(tmp_path_factory.mktemp("bpe"))
