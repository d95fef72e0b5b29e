"""Every format, saved at one TP x PP split, reads back as the global canonical tensors at any slice."""
import tarfile
from pathlib import Path

import pytest
import sentencepiece
import torch

from fleetgen.model.checkpoint import lazy
from fleetgen.model.checkpoint.hf import HFSource
from fleetgen.model.checkpoint.nemo import nemo_model_config
from fleetgen.model.checkpoint.open import detect_format, open_checkpoint
from fleetgen.model.config import ModelConfig
from fleetgen.model.generate import greedy_plan
from fleetgen.model.load import build_generator
from fleetgen.model.parallel import ParallelState
from fleetgen.model.tokenizer import load_tokenizer
from tests import hf_reference as ref
from tests import tokenizer_fixtures
from tests.checkpoint_writers import (canonical_tensors, padded, train_sentencepiece, write_distckpt, write_megatron,
                                      write_nemo)
from tests.distributed import run_ranks

NEMO_GPT = dict(family="nemo_gpt", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                num_query_groups=4, head_dim=8, max_position_embeddings=64, position_embedding="rope",
                rotary_percent=0.5, normalization="layernorm1p", activation="swiglu", qkv_bias=False,
                proj_bias=False, mlp_bias=False, tie_word_embeddings=False)
NEMO_GELU = dict(NEMO_GPT, num_layers=4, ffn_hidden_size=64, position_embedding="learned", rotary_percent=1.0,
                 normalization="layernorm", activation="gelu_tanh", qkv_bias=True, proj_bias=True, mlp_bias=True,
                 tie_word_embeddings=True)
NEMOTRON = dict(NEMO_GPT, family="nemotron", num_query_groups=2, ffn_hidden_size=64, activation="squared_relu")
GPT2 = dict(family="gpt2", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
            num_query_groups=4, head_dim=8, max_position_embeddings=32)
GPT2_HEAD64 = dict(GPT2, hidden_size=128, ffn_hidden_size=96, num_attention_heads=2, num_query_groups=2, head_dim=64)
MEGATRON_MODERN = dict(NEMO_GPT, family="gpt2", num_query_groups=2)
sp_model, bpe_dir = tokenizer_fixtures.sp_model, tokenizer_fixtures.bpe_dir


def make_config(fields: dict, tokenizer_path) -> ModelConfig:
    tok = load_tokenizer(tokenizer_path)
    return ModelConfig(**fields, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)


def requests(shape: tuple) -> list[tuple]:
    """(rows, cols) slices a model at TP 1, 2 or 4 asks for, plus one that straddles shard boundaries."""
    out = [(None, None), (slice(1, shape[0] - 1), None if len(shape) == 1 else slice(1, shape[1] - 1))]
    for tp in (1, 2, 4):
        if shape[0] % tp == 0:
            step = shape[0] // tp
            out += [(slice(r * step, (r + 1) * step), None) for r in range(tp)]
        if len(shape) == 2 and shape[1] % tp == 0:
            step = shape[1] // tp
            out += [(None, slice(r * step, (r + 1) * step)) for r in range(tp)]
    return out


def assert_reads_back(source, config: ModelConfig, expected: dict) -> None:
    assert source.config == config
    assert source.names() == set(expected)
    for name, full in expected.items():
        assert source.shape(name) == tuple(full.shape), name
        for rows, cols in requests(tuple(full.shape)):
            got = source.read(name, rows, cols)
            want = full[rows or slice(None)] if full.dim() == 1 else full[rows or slice(None), cols or slice(None)]
            assert got.dtype == full.dtype and torch.equal(got, want), (name, rows, cols)


@pytest.mark.parametrize("fields,tp,pp,archive,options", [
    (NEMO_GPT, 1, 1, None, {}),
    (NEMO_GPT, 2, 1, None, {"amp_o2": True}),
    (NEMO_GPT, 1, 2, "tar", {}),
    (NEMO_GPT, 2, 2, "tar", {}),
    (NEMO_GPT, 2, 1, "gz", {"swiglu": "swiglu"}),
    (NEMO_GELU, 2, 2, None, {}),
])
def test_legacy_nemo_reads_back_at_every_slice(tmp_path, sp_model, fields, tp, pp, archive, options):
    config = make_config(fields, sp_model)
    tensors = canonical_tensors(config)
    path = write_nemo(tmp_path / "model.nemo", config, tensors, sp_model, tp, pp, archive=archive, **options)
    source = open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert_reads_back(source, config, padded(config, tensors, tp))
    assert source.tokenizer().encode("lazy zebras") == \
        sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).encode("lazy zebras")


def test_nemo_with_a_gpt2_tokenizer_packed_inside(tmp_path, bpe_dir):
    config = make_config(NEMO_GELU, bpe_dir / "vocab.json")
    tensors = canonical_tensors(config)
    path = write_nemo(tmp_path / "gpt.nemo", config, tensors, bpe_dir, archive="tar")
    source = open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert_reads_back(source, config, padded(config, tensors, 1))
    assert source.tokenizer().encode("quick fox") == load_tokenizer(bpe_dir / "vocab.json").encode("quick fox")


def test_tar_members_are_extracted_once_into_the_cache(tmp_path, sp_model):
    config = make_config(NEMO_GPT, sp_model)
    path = write_nemo(tmp_path / "m.nemo", config, canonical_tensors(config), sp_model, 2, 2, archive="tar")
    open_checkpoint(path, cache_dir=tmp_path / "cache")
    extracted = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock")
    assert len(extracted) == 6  # config, tokenizer, four shards: nothing else, no partial files
    stamps = [p.stat().st_mtime_ns for p in extracted]
    open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert [p.stat().st_mtime_ns for p in extracted] == stamps


@pytest.mark.parametrize("fields,tp,pp,version,with_args", [
    (GPT2, 1, 1, 0, True),
    (GPT2, 2, 1, 0, True),
    (GPT2, 2, 2, 1.0, True),
    (GPT2, 1, 2, 2.0, True),
    (GPT2, 2, 2, 3.0, True),
    (GPT2_HEAD64, 2, 1, 3.0, False),
    (MEGATRON_MODERN, 2, 2, 3.0, True),
])
def test_megatron_reads_back_at_every_slice(tmp_path, bpe_dir, fields, tp, pp, version, with_args):
    config = make_config(fields, bpe_dir / "vocab.json")
    tensors = canonical_tensors(config)
    path = write_megatron(tmp_path / "megatron", config, tensors, tp, pp, version, with_args, tokenizer_dir=bpe_dir)
    source = open_checkpoint(path)
    assert_reads_back(source, config, padded(config, tensors, tp))
    assert source.shape("embedding.word_embeddings.weight")[0] == {1: 384, 2: 512}[tp]  # 320 tokens, padded


def test_megatron_iteration_directory_and_explicit_tokenizer(tmp_path, bpe_dir):
    config = make_config(GPT2, bpe_dir / "vocab.json")
    tensors = canonical_tensors(config)
    path = write_megatron(tmp_path / "megatron", config, tensors, release=False)
    source = open_checkpoint(path, format="megatron", tokenizer=bpe_dir / "tokenizer.json")
    assert_reads_back(source, config, padded(config, tensors, 1))


@pytest.mark.parametrize("fields,tp,backend,dtype", [
    (NEMOTRON, 1, "zarr", torch.bfloat16),
    (NEMOTRON, 2, "zarr", torch.float32),
    (NEMOTRON, 2, "torch_dist", torch.bfloat16),
    (NEMO_GPT, 2, "zarr", torch.bfloat16),
    (NEMO_GELU, 2, "torch_dist", torch.float32),
])
def test_distributed_checkpoint_reads_back_at_every_slice(tmp_path, sp_model, fields, tp, backend, dtype):
    config = make_config(fields, sp_model)
    tensors = canonical_tensors(config, dtype=dtype)
    path = write_distckpt(tmp_path / "nemotron", config, tensors, sp_model, tp, backend)
    assert detect_format(path) == "distckpt"
    assert_reads_back(open_checkpoint(path), config, padded(config, tensors, tp))


def test_distributed_checkpoint_inside_a_nemo_tar(tmp_path, sp_model):
    config = make_config(NEMOTRON, sp_model)
    tensors = canonical_tensors(config, dtype=torch.bfloat16)
    directory = write_distckpt(tmp_path / "dist", config, tensors, sp_model, 2, "torch_dist")
    with tarfile.open(tmp_path / "nemotron.nemo", "w:") as tar:
        tar.add(directory, arcname=".")
    assert detect_format(tmp_path / "nemotron.nemo") == "distckpt"
    source = open_checkpoint(tmp_path / "nemotron.nemo", cache_dir=tmp_path / "cache")
    assert_reads_back(source, config, padded(config, tensors, 2))


def test_hugging_face_directories_go_to_hfsource(tmp_path, sp_model):
    directory = ref.save(ref.build("gpt2"), tmp_path / "hf")
    source = open_checkpoint(directory)
    assert isinstance(source, HFSource) and source.config.family == "gpt2"
    replaced = open_checkpoint(directory, tokenizer=sp_model)
    assert replaced.tokenizer().encode("lazy dog") == load_tokenizer(sp_model).encode("lazy dog")
    assert replaced.names() == source.names() and replaced.config == source.config
    name = "layers.1.self_attention.query.weight"
    assert torch.equal(replaced.read(name, slice(8, 16), slice(0, 32)), source.read(name, slice(8, 16), slice(0, 32)))


def test_file_mappings_are_dropped_once_reads_touch_the_budget(tmp_path, sp_model, monkeypatch):
    config = make_config(NEMO_GPT, sp_model)
    path = write_nemo(tmp_path / "m", config, canonical_tensors(config), sp_model)
    weights = str(path / "model_weights.ckpt")
    source = open_checkpoint(path)
    source.read("layers.0.mlp.gate.weight")
    assert weights in Path("/proc/self/maps").read_text()  # small reads keep the mapping, and its index
    monkeypatch.setattr(lazy, "MAPPED_BYTES_BUDGET", 0)
    source.read("layers.0.mlp.gate.weight")
    assert weights not in Path("/proc/self/maps").read_text()  # unmapped: its pages leave our RSS


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


@pytest.mark.parametrize("yaml_fields,expected", [
    ({"activation": "gelu"}, {"activation": "gelu_tanh"}),  # fused bias-gelu is on by default
    ({"activation": "gelu", "bias_activation_fusion": False}, {"activation": "gelu"}),
    ({"activation": "gelu", "bias_activation_fusion": False, "openai_gelu": True}, {"activation": "gelu_tanh"}),
    ({"activation": "gelu", "bias": False}, {"activation": "gelu", "qkv_bias": False, "mlp_bias": False}),
    ({"activation": "fast-swiglu"}, {"activation": "swiglu"}),
    ({"activation": "squared-relu", "num_query_groups": 2}, {"family": "nemotron", "num_query_groups": 2}),
    ({"kv_channels": 16}, {"head_dim": 16}),
    ({"max_position_embeddings": None, "encoder_seq_length": 128}, {"max_position_embeddings": 128}),
    ({"normalization": "LayerNorm", "layernorm_zero_centered_gamma": True}, {"normalization": "layernorm1p"}),
    ({"position_embedding_type": "rope", "rotary_percentage": 0.5, "rotary_base": 500000},
     {"position_embedding": "rope", "rotary_percent": 0.5, "rotary_base": 500000.0}),
    ({"share_embeddings_and_output_weights": False}, {"tie_word_embeddings": False}),
])
def test_model_config_yaml_mapping(sp_model, yaml_fields, expected):
    base = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
            "max_position_embeddings": 64, "encoder_seq_length": 64}
    config = nemo_model_config({**base, **yaml_fields}, load_tokenizer(sp_model), "model_config.yaml")
    assert (config.vocab_size, config.bos_id, config.eos_id, config.pad_id) == (100, 1, 2, 0)
    for field, value in expected.items():
        assert getattr(config, field) == value, field


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


def _prefill_logits(rank: int, world_size: int, tp: int, pp: int, paths: dict, sp, cache) -> dict:
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
        plan.return_logits = True
        out[family] = generator.step(plan).logits
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", list(SAVED_AT))
def test_loaded_at_any_split_matches_hugging_face(tmp_path, parity, tp, pp):
    sp, cases = parity
    paths = {family: saved[(tp, pp)] for family, (_, saved) in cases.items()}
    per_rank = run_ranks(_prefill_logits, tp * pp, tp, pp, paths, sp, tmp_path / "cache")
    for family, (want_logits, _) in cases.items():
        for rank, results in enumerate(per_rank):
            for row, want in enumerate(want_logits):
                diff = (results[family][row, :len(want)] - want).abs().max().item()
                assert diff <= 1e-4, f"{family} saved at {SAVED_AT[(tp, pp)]}, rank {rank}, prompt {row}: {diff}"
