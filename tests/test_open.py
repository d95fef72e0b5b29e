"""Opening a checkpoint (model/checkpoint/open.py): format detection, re-slicing across splits, architecture
checks, and parity with Hugging Face at any split."""

import pytest
import torch

from fleetgen.model.checkpoint.hf import HFSource
from fleetgen.model.checkpoint.open import detect_format, open_checkpoint, validate_against
from fleetgen.model.generate import greedy_plan
from fleetgen.model.load import build_generator
from fleetgen.model.parallel import ParallelState
from fleetgen.model.tokenizer import load_tokenizer
from tests import hf_reference as ref
from tests.checkpoint_writers import (GPT2, NEMO_GPT, canonical_tensors, make_config, nemo_config, raises,
                                      train_sentencepiece, write_distckpt, write_megatron, write_nemo)
from tests.distributed import run_ranks


def test_hugging_face_directories_go_to_hfsource(tmp_path, sp_model):
    directory = ref.save(ref.build("gpt2"), tmp_path / "hf")
    source = open_checkpoint(directory)
    assert isinstance(source, HFSource) and source.config.family == "gpt2"
    replaced = open_checkpoint(directory, tokenizer=sp_model)
    assert replaced.tokenizer().encode("lazy dog") == load_tokenizer(sp_model).encode("lazy dog")
    assert replaced.names() == source.names() and replaced.config == source.config
    name = "layers.1.self_attention.query.weight"
    assert torch.equal(replaced.read(name, slice(8, 16), slice(0, 32)), source.read(name, slice(8, 16), slice(0, 32)))


def test_saved_at_2x2_read_as_1x1_and_vice_versa(tmp_path, sp_model):
    config = make_config(NEMO_GPT, sp_model)
    tensors = canonical_tensors(config)
    wide = open_checkpoint(write_nemo(tmp_path / "a", config, tensors, sp_model, 2, 2))
    single = open_checkpoint(write_nemo(tmp_path / "b", config, tensors, sp_model, 1, 1))
    assert wide.names() == single.names()
    for name in wide.names():
        rows = single.shape(name)[0]
        if "word_embeddings" in name or "output_layer" in name:
            rows = config.vocab_size  # padding differs: 128 x TP rows
        assert torch.equal(wide.read(name, slice(0, rows)), single.read(name, slice(0, rows))), name
        half = slice(0, rows // 2)
        assert torch.equal(single.read(name, half), wide.read(name, half)), name


def test_detect_format(tmp_path, sp_model, bpe_dir):
    config = make_config(NEMO_GPT, sp_model)
    tensors = canonical_tensors(config)
    assert detect_format(write_nemo(tmp_path / "x.nemo", config, tensors, sp_model, archive="tar")) == "nemo"
    assert detect_format(write_nemo(tmp_path / "d", config, tensors, sp_model, 2, 1)) == "nemo"
    assert detect_format(write_nemo(tmp_path / "p", config, tensors, sp_model, 1, 2)) == "nemo"
    gpt2 = make_config(GPT2, bpe_dir / "vocab.json")
    assert detect_format(write_megatron(tmp_path / "m", gpt2, canonical_tensors(gpt2))) == "megatron"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert detect_format(tmp_path / "hf") == "hf"


# ---- loaded by the model at every split, against Hugging Face ------------------------------------------

SAVED_AT = {(1, 1): (2, 2), (2, 1): (1, 2), (1, 2): (2, 1), (2, 2): (1, 1)}  # loaded at -> saved at


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """The weights of tiny HF models (gpt2, nemo_gpt, nemotron) in their native formats at every split.

    Returns (tokenizer, {family: (HF logits per prompt, {load split: checkpoint saved at another split})}).
    """
    root = tmp_path_factory.mktemp("parity")
    sp = train_sentencepiece(root / "sp", vocab_size=ref.VOCAB)  # bos 1, eos 2 like the HF models
    out = {}
    for family in ("gpt2", "nemo_gpt", "nemotron"):
        model = ref.build(family)
        hf = ref.open_source(ref.save(model, root / f"hf-{family}"))
        tensors = {name: hf.read(name) for name in hf.names()}
        paths = {}
        for split, (tp, pp) in SAVED_AT.items():
            path = root / f"{family}-{tp}x{pp}"
            if family == "gpt2":
                paths[split] = write_megatron(path, hf.config, tensors, tp, pp)
            elif family == "nemo_gpt":
                paths[split] = write_nemo(path.with_suffix(".nemo"), hf.config, tensors, sp, tp, pp, archive="tar")
            else:
                paths[split] = write_distckpt(path, hf.config, tensors, sp, tp, "zarr" if tp == 1 else "torch_dist")
        out[family] = (ref.reference_logits(model), paths)
    return sp, out


def _prefill_logprobs(rank: int, world_size: int, tp: int, pp: int, paths: dict, sp, cache) -> dict:
    torch.set_num_threads(1)
    ps = ParallelState.build(tp, pp)
    lengths = torch.tensor([len(p) for p in ref.PROMPTS])
    tokens = torch.zeros(len(ref.PROMPTS), int(lengths.max()), dtype=torch.long)
    for row, prompt in enumerate(ref.PROMPTS):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    out = {}
    for family, path in paths.items():
        # Megatron-LM checkpoints bring no tokenizer of their own: GPT-2's vocab.json would sit beside them
        source = open_checkpoint(path, tokenizer=sp if family == "gpt2" else None, cache_dir=cache)
        generator = build_generator(source, ps, "fp32", max_batch=4, max_seq_len=16)
        plan = greedy_plan("prefill", torch.arange(len(ref.PROMPTS)), tokens, lengths)
        plan.full_logprobs = True
        out[family] = generator.step(plan).full_logprobs
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", list(SAVED_AT))
def test_loaded_at_any_split_matches_hugging_face(tmp_path, parity, tp, pp):
    sp, cases = parity
    paths = {family: saved[(tp, pp)] for family, (_, saved) in cases.items()}
    per_rank = run_ranks(_prefill_logprobs, tp * pp, tp, pp, paths, sp, tmp_path / "cache")
    for family, (want_logits, _) in cases.items():
        for rank, results in enumerate(per_rank):
            for row, want in enumerate(want_logits):
                diff = (results[family][row, :len(want)] - want.log_softmax(-1)).abs().max().item()
                assert diff <= 1e-4, f"{family} saved at {SAVED_AT[(tp, pp)]}, rank {rank}, prompt {row}: {diff}"


def test_nothing_recognisable(tmp_path):
    with raises(rf"{tmp_path}: not a checkpoint fleetgen reads; looked for config.json"):
        open_checkpoint(tmp_path)
    with raises(rf"{tmp_path / 'absent'}: no such file or directory"):
        open_checkpoint(tmp_path / "absent")
    with raises(r"format='safetensors' is not one of"):
        open_checkpoint(tmp_path, format="safetensors")


def test_validate_against(sp_model):
    config = nemo_config(sp_model)
    validate_against(config, {"model.architecture.num_layers": 2, "hidden_size": 32, "rotary_base": 10000,
                              "ffn_hidden_size": None})
    with raises(r"^model.architecture.num_layers=96 but the checkpoint says 2$"):
        validate_against(config, {"model.architecture.num_layers": 96})
    with raises(r"model.architecture.layers: 'layers' is not a model field; valid: family, num_layers"):
        validate_against(config, {"model.architecture.layers": 2})
