"""The shipped tiny GPT-2 (recipes/data/tiny-gpt2) loads offline, tokenizes losslessly and was really trained."""
import importlib.util
import json
import math
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2LMHeadModel

DATA = Path(str(resources.files("fleetgen.recipes") / "data"))
MODEL_DIR = DATA / "tiny-gpt2"
SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "train_tiny_model.py"
EOT = "<|endoftext|>"


def _training_script():
    spec = importlib.util.spec_from_file_location("train_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _training_script()


@pytest.fixture(scope="module")
def tokenizer():
    tok = ByteLevelBPETokenizer.from_file(str(MODEL_DIR / "vocab.json"), str(MODEL_DIR / "merges.txt"))
    tok.add_special_tokens([EOT])
    return tok


@pytest.fixture(scope="module")
def model():
    lm = GPT2LMHeadModel.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True)
    return lm.eval()


def test_shipped_files_fit_the_budget_and_agree():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "README.md"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= 4 * 1024 * 1024
    config = json.loads((MODEL_DIR / "config.json").read_text())
    vocab = json.loads((MODEL_DIR / "vocab.json").read_text())
    assert (config["n_positions"], config["n_layer"], config["n_head"]) == (512, 4, 4)
    assert config["vocab_size"] == len(vocab) == 2048
    assert config["bos_token_id"] == config["eos_token_id"] == vocab[EOT] == 2047
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert (MODEL_DIR / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_weights_are_stored_in_fp16_and_load_as_fp32(model):
    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as f:
        stored = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert stored == {"F16"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.vocab_size == 2048


@pytest.mark.parametrize("text", [
    "It is a truth universally acknowledged, that a single man",
    "  \"Oh!\" cried she--\n\nMrs. Bennet's £5,000 café, naïve; 1811.\t",
    f"First volume.{EOT}Second volume.",
])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert all(0 <= i < 2048 for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_end_of_text_is_one_special_token(tokenizer):
    ids = tokenizer.encode(f"a{EOT}b").ids
    assert ids.count(2047) == 1 and len(ids) == 3
    assert tokenizer.token_to_id(EOT) == 2047


def test_heldout_loss_is_far_below_uniform(script, tokenizer, model):
    heldout = [script.split_book(text)[1] for text in script.read_books().values()]
    stream = script.token_stream(tokenizer, heldout)
    loss = script.heldout_loss(model, stream)
    assert loss < math.log(2048) - 3.0, f"held-out loss {loss:.3f} vs uniform {math.log(2048):.3f}"


def _corpus_words(script) -> set[str]:
    return {w.lower() for text in script.read_books().values() for w in re.findall(r"[A-Za-z]+", text)}


def test_greedy_continuations_are_mostly_english_words(script, tokenizer, model):
    prompts = [json.loads(line)["prompt"] for line in (DATA / "tiny_prompts.jsonl").read_text().splitlines()]
    words = []
    for prompt in prompts[:4]:
        ids = torch.tensor([tokenizer.encode(prompt).ids])  # [1, prompt_len]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=2047)
        words += re.findall(r"[A-Za-z]+", tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    known = _corpus_words(script)
    assert len(words) >= 60
    hits = sum(w.lower() in known for w in words)
    assert hits / len(words) >= 0.9, f"only {hits}/{len(words)} generated words are corpus words: {words}"


def test_prompts_file_has_eight_distinct_prompts():
    rows = [json.loads(line) for line in (DATA / "tiny_prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert len({r["id"] for r in rows}) == 8 and len({len(r["prompt"]) for r in rows}) == 8
    with_budget = [r for r in rows if "tokens_to_generate" in r]
    assert len(with_budget) == 1 and isinstance(with_budget[0]["tokens_to_generate"], int)
    assert all(set(r) <= {"id", "prompt", "tokens_to_generate"} for r in rows)
