"""Tokenizers of the seed checkpoints: SentencePiece `.model` files and GPT-2 style byte-level BPE.

Encodings are those of the sentencepiece and tokenizers libraries used directly; no special tokens are
added by encode (the server adds BOS itself when asked).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from fleetgen.model.checkpoint.source import CheckpointError, Tokenizer

GPT2_EOD = "<|endoftext|>"  # GPT-2's single special token: both BOS and EOS


class SentencePieceTokenizer:
    def __init__(self, path: Path, bos_id=None, eos_id=None, pad_id=None):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a SentencePiece model: {e}") from None
        self.path = path
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = _given_or(bos_id, self._sp.bos_id())
        self.eos_id = _given_or(eos_id, self._sp.eos_id())
        self.pad_id = _given_or(pad_id, self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


class BPETokenizer:
    """Byte-level BPE from a tokenizer.json, or from GPT-2's vocab.json + merges.txt."""

    def __init__(self, tokenizer, path: Path, special: dict, bos_id=None, eos_id=None, pad_id=None):
        self._tok = tokenizer
        self.path = path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        found = {}
        for kind, token in special.items():
            found[kind] = tokenizer.token_to_id(token)
            if found[kind] is None:
                raise CheckpointError(f"{path.parent}/tokenizer_config.json: {kind}_token {token!r} is not in "
                                      f"the vocabulary of {path.name}")
        self.bos_id = _given_or(bos_id, found.get("bos"))
        self.eos_id = _given_or(eos_id, found.get("eos"))
        self.pad_id = _given_or(pad_id, found.get("pad"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.path}")
        return piece


def _given_or(given: Optional[int], found: Optional[int]) -> Optional[int]:
    if given is not None:
        return given
    return None if found is None or found < 0 else found


def _special_tokens(directory: Path, vocab: dict) -> dict:
    """BOS/EOS/PAD token strings: tokenizer_config.json when present, else GPT-2's <|endoftext|>."""
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        # HF writes special tokens either as strings or as {"content": ...} objects
        return {k: (v["content"] if isinstance(v, dict) else v)
                for k in ("bos", "eos", "pad") if (v := config.get(f"{k}_token"))}
    return {"bos": GPT2_EOD, "eos": GPT2_EOD} if GPT2_EOD in vocab else {}


def _from_tokenizer_json(path: Path, **ids) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: not a tokenizers tokenizer.json: {e}") from None
    return BPETokenizer(tok, path, _special_tokens(path.parent, tok.get_vocab()), **ids)


def _from_vocab_merges(vocab: Path, merges: Path, **ids) -> BPETokenizer:
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    for f in (vocab, merges):
        if not f.is_file():
            raise CheckpointError(f"{f}: file not found (GPT-2 BPE needs vocab.json and merges.txt)")
    try:
        tok = ByteLevelBPETokenizer(str(vocab), str(merges))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{vocab}, {merges}: not a GPT-2 vocabulary: {e}") from None
    special = _special_tokens(vocab.parent, tok.get_vocab())
    present = sorted({t for t in special.values() if tok.token_to_id(t) is not None})
    tok.add_special_tokens([AddedToken(t, special=True) for t in present])  # as GPT-2's own tokenizer does
    return BPETokenizer(tok, vocab, special, **ids)


def given_tokenizer(tokenizer) -> Tokenizer:
    """A tokenizer given in place of a checkpoint's own: a path (str or Path) is loaded, a Tokenizer kept. (A str
    has an `encode` method too, so duck typing cannot tell them apart.)"""
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer


def load_tokenizer(path: Union[str, Path], bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                   pad_id: Optional[int] = None, merges: Optional[Union[str, Path]] = None) -> Tokenizer:
    """A tokenizer from a file (.model, tokenizer.json, vocab.json) or a directory holding one.

    A vocab.json takes its merges.txt from `merges`, else from beside it. Given ids override the file's.
    """
    path = Path(path)
    ids = {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}
    if path.is_dir():
        path = _find_in(path)
    elif not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, **ids)
    if path.suffix == ".json" and _is_tokenizer_json(path):
        return _from_tokenizer_json(path, **ids)
    return _from_vocab_merges(path, Path(merges) if merges else path.parent / "merges.txt", **ids)


def _is_tokenizer_json(path: Path) -> bool:
    """A tokenizers file has a "model" object; a GPT-2 vocab.json maps every token to an int."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON: {e}") from None
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def _find_in(directory: Path) -> Path:
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    if (directory / "vocab.json").is_file():
        return directory / "vocab.json"
    models = sorted(directory.glob("*.model"))
    if len(models) == 1:
        return models[0]
    if len(models) > 1:
        raise CheckpointError(f"{directory}: several SentencePiece models ({', '.join(m.name for m in models)});"
                              f" name the file")
    raise CheckpointError(f"{directory}: no tokenizer found (looked for tokenizer.json, vocab.json + merges.txt,"
                          f" *.model)")
