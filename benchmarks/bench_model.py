"""The benchmark's model and prompts: GPT-2-small-shaped random weights (12 layers, hidden 768, 12 heads,
vocab 50257) saved as a Hugging Face directory that fleetgen, transformers and CTranslate2 all read.

Its byte-level BPE has GPT-2's size (256 bytes + 50000 merges + <|endoftext|>) but merges only bytes outside
the ASCII letters, so a prompt of n lowercase letters is exactly n tokens in every engine, text or ids.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from fleetgen.model.serve.vocabulary import byte_alphabet

VOCAB = 50257
EOD = "<|endoftext|>"


def write_tokenizer(directory: Path) -> None:
    alphabet = byte_alphabet()
    letters = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    pieces = [c for c in alphabet if c not in letters][:64]  # merged among themselves only
    merges, level = [], list(pieces)
    while len(merges) < VOCAB - 257:
        level = [a + b for a in level[:256] for b in pieces]
        merges += [(token[:-1], token[-1]) for token in level][:VOCAB - 257 - len(merges)]
    vocab = {token: i for i, token in enumerate(alphabet + [a + b for a, b in merges] + [EOD])}
    assert len(vocab) == VOCAB
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOD, "eos_token": EOD, "unk_token": EOD,
         "model_max_length": 1024}))


def gpt2_small(directory: Path) -> Path:
    """Create (once) and return the benchmark model's directory."""
    if (directory / "model.safetensors").is_file() and (directory / "vocab.json").is_file():
        return directory
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    GPT2LMHeadModel(config).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


PROMPT_TOKENS = 32  # the benchmarks' prompt length, in tokens (one token a letter)


def prompts(count: int, length: int, seed: int = 0) -> list[str]:
    """count texts of length lowercase letters: length tokens each."""
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(count)]


def token_ids(directory: Path, texts: list[str]) -> list[list[int]]:
    vocab = json.loads((directory / "vocab.json").read_text())
    return [[vocab[c] for c in text] for text in texts]
