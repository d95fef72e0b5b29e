"""Each token's bytes, what a grammar engine matches the generated text against.

A tokenizer's pieces are not its bytes: byte-level BPE (GPT-2) writes each byte as a printable character
(bytes_to_unicode), SentencePiece writes a space as "▁" and an unencodable byte as "<0xNN>". Special tokens
(end of document, BOS, padding, SentencePiece's controls) stand for no text: they come back apart, so that a
grammar never matches them as text.
"""
from __future__ import annotations

import re

from fleetgen.model.checkpoint.source import Tokenizer

SPACE_MARK = "\u2581"  # SentencePiece's "▁"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable character standing for each byte, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """Every id's bytes (b"" for a special token), and the special ids. Byte-level when every ordinary piece is
    written in GPT-2's byte alphabet and none holds "▁"; SentencePiece's conventions otherwise."""
    special = {i for i in (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) if i is not None}
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    byte_of = {c: b for b, c in enumerate(byte_alphabet())}
    byte_level = all(SPACE_MARK not in p and all(c in byte_of for c in p)
                     for i, p in enumerate(pieces) if i not in special)
    if not byte_level:  # SentencePiece's <s>, </s>, <unk>, <pad>...: markup, not text ("<" is not a byte there)
        special |= {i for i, p in enumerate(pieces) if len(p) > 2 and p[0] == "<" and p[-1] == ">"
                    and not BYTE_PIECE.fullmatch(p)}
    out = []
    for i, piece in enumerate(pieces):
        if i in special:
            out.append(b"")
        elif byte_level:
            out.append(bytes(byte_of[c] for c in piece))
        elif match := BYTE_PIECE.fullmatch(piece):
            out.append(bytes([int(match.group(1), 16)]))
        else:
            out.append(piece.replace(SPACE_MARK, " ").encode())
    return out, sorted(special)
