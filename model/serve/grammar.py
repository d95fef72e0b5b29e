"""The leader's grammar matchers: one per constrained sequence, llguidance's LLMatcher over the model's
vocabulary (model/constraints.py says why llguidance).

Before each step the engine asks for the step's bitmask: int32 [n, ceil(vocab / 32)], all ones for a row
without a constraint, the matcher's allowed tokens for one with (the end-of-document token only once the
grammar is complete). The bitmask travels with the plan to the output rank (protocol.py), which masks the
logits before sampling (model/sampling.py). When the step lands, each constrained row's matcher accepts its
token; a matcher that can take no further token ends its sequence.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import torch

from fleetgen.model.checkpoint.source import Tokenizer
from fleetgen.model.constraints import Constraint, ConstraintError
from fleetgen.model.serve.vocabulary import token_bytes

log = logging.getLogger(__name__)


class Grammars:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_id: Optional[int]):
        self.tokenizer, self.vocab_size, self.eos_id = tokenizer, vocab_size, eos_id
        self.words = -(-vocab_size // 32)
        self._ll_tokenizer = None  # built at the first constrained request: a second or two for a large vocabulary
        self._lock = threading.Lock()

    def matcher(self, constraint: Constraint) -> Any:
        """A fresh matcher for one sequence; ConstraintError when the grammar does not fit this vocabulary."""
        import llguidance

        if self.eos_id is None:
            raise ConstraintError("the model has no end-of-document token to end a constrained output with")
        matcher = llguidance.LLMatcher(self._tokenizer(), constraint.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(matcher.get_error())
        return matcher

    def bitmask(self, matchers: list[Any]) -> Optional[torch.Tensor]:
        """The step's allowed tokens, one row per sequence (None where unconstrained); None when no row is."""
        if all(m is None for m in matchers):
            return None
        from llguidance.torch import fill_next_token_bitmask

        mask = torch.full((len(matchers), self.words), -1, dtype=torch.int32)
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                fill_next_token_bitmask(matcher, mask, row)
        return mask

    @staticmethod
    def accept(matcher: Any, token: int) -> bool:
        """The matcher takes the sampled token; whether its sequence must end here (nothing more can follow)."""
        if not matcher.consume_token(token):
            log.error("grammar matcher refused token %d it allowed: %s", token, matcher.get_error())
            return True
        return matcher.is_stopped()

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(
                    _Vocabulary(self.tokenizer, self.vocab_size, self.eos_id)))
            return self._ll_tokenizer


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes over the model's whole vocabulary (ids past the
    tokenizer's are never text), the special ids and an encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_id: Optional[int]):
        tokens, special = token_bytes(tokenizer)
        self.tokens = (tokens + [b""] * vocab_size)[:vocab_size]
        self.special_token_ids = sorted(set(special) | set(range(len(tokens), vocab_size)))
        self.eos_token_id, self.bos_token_id = eos_id, tokenizer.bos_id
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)
