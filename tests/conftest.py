"""Fixtures shared by the test modules: tiny tokenizers (trained once per module) and small checkpoints."""
import io
import os

import pytest
import torch

from fleetgen.model.generate import Generator
from fleetgen.model.load import build_generator
from fleetgen.model.parallel import ParallelState
from fleetgen.model.tokenizer import SentencePieceTokenizer, load_tokenizer
from tests import hf_reference as ref
from tests.checkpoint_writers import (canonical_tensors, gpt2_config, nemo_config, train_gpt2_bpe, train_sentencepiece,
                                      write_distckpt, write_megatron, write_nemo)
from tests.server_fixtures import CORPUS, build_tiny_checkpoint

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def nemo_dir(tmp_path, sp_model):
    config = nemo_config(sp_model)
    return write_nemo(tmp_path / "nemo", config, canonical_tensors(config), sp_model, tp=2, pp=2)


@pytest.fixture
def megatron_dir(tmp_path, bpe_dir):
    config = gpt2_config(bpe_dir)
    return write_megatron(tmp_path / "megatron", config, canonical_tensors(config), tp=2, tokenizer_dir=bpe_dir)


@pytest.fixture
def zarr_dir(tmp_path, sp_model):
    config = nemo_config(sp_model)
    return write_distckpt(tmp_path / "dist", config, canonical_tensors(config), sp_model, tp=2)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_gpt2_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    model = ref.build("gpt2")
    directory = ref.save(model, tmp_path_factory.mktemp("gpt2"))
    return model, directory


@pytest.fixture()
def generator(gpt2) -> Generator:
    torch.manual_seed(0)
    return build_generator(ref.open_source(gpt2[1]), ParallelState.single(), "fp32", max_batch=4,
                           max_seq_len=48)


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
