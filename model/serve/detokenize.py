"""The text of tokens: what each new token adds to a decoded sequence, each token's string and offset, and an
OpenAI completion's text as its tokens arrive."""
from __future__ import annotations

from itertools import accumulate
from typing import Optional

from fleetgen.model.checkpoint.source import Tokenizer

DETOKENIZE_CONTEXT = 5  # tokens of context that fix how the next token decodes (vLLM's choice)


class IncrementalText:
    """The text each new token adds to a decoded sequence. Decoding a short window rather than one token
    keeps what depends on context right: a SentencePiece word's leading space, a character split over
    byte-level tokens (no text until its last byte arrives)."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer, self.ids = tokenizer, list(context)
        self.prefix_start, self.read_start = max(0, len(self.ids) - DETOKENIZE_CONTEXT), len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What tokens still held back add (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_start:self.read_start])
        full = self.tokenizer.decode(self.ids[self.prefix_start:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_start, self.read_start = self.read_start, len(self.ids)
        return full[len(prefix):]


def token_spans(tokenizer: Tokenizer, ids: list[int], hidden: int = 0) -> tuple[list[str], list[int], str]:
    """Each token's string and character offset in the text of ids[hidden:], and that text. A token adding
    no text (a special token, the first bytes of a character) shows its vocabulary piece; the first
    `hidden` tokens (an added BOS) are not part of the text."""
    text = IncrementalText(tokenizer)
    parts = [text.add(t) for t in ids[hidden:]]
    if parts:
        parts[-1] += text.flush()
    offsets = list(accumulate([0] * hidden + [len(p) for p in parts], initial=0))[:len(ids)]
    pieces = [s or tokenizer.id_to_piece(t) for s, t in zip([""] * hidden + parts, ids)]
    return pieces, offsets, "".join(parts)


class CompletionText:
    """An OpenAI completion's text as its tokens arrive: the end-of-document token adds none, and the text
    ends before the first stop string. Until the end, text that may begin a stop string is held back."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stops: list[str], eos_id: Optional[int]):
        self._text, self._eos_id, self._stops = IncrementalText(tokenizer, prompt), eos_id, stops
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent = "", 0

    def add(self, token: int) -> str:
        """New text that is safe to show."""
        if token != self._eos_id:
            self.text += self._text.add(token)
        return self._release(min(self._end(), len(self.text) - self._holdback))

    def finish(self) -> str:
        self.text += self._text.flush()
        self.text = self.text[:self._end()]
        return self._release(len(self.text))

    def _end(self) -> int:
        """Where the shown text ends: before the first stop string."""
        return min([self.text.find(s) for s in self._stops if s in self.text] + [len(self.text)])

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        shown, self.sent = self.text[self.sent:upto], upto
        return shown
