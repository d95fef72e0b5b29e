"""What a landed step means for its sequences: their new tokens and log-probabilities, whether they are done,
and their results.

The runner's StepOutput holds one row per sequence of the step, on the host (one copy from the device a step).
"""
from __future__ import annotations

from concurrent.futures import InvalidStateError
from dataclasses import dataclass
from typing import Optional

import torch

from fleetgen.model.checkpoint.source import Tokenizer
from fleetgen.model.generate import StepOutput
from fleetgen.model.serve.scheduler import ScheduledStep, SequenceState


@dataclass
class SequenceResult:
    prompt: list[int]
    tokens: list[int]               # generated, the stopping token included
    finish_reason: str              # "stop" | "length"
    logprobs: Optional[list[float]] = None       # len(prompt) + len(tokens) - 1
    full_logprobs: Optional[torch.Tensor] = None  # [len(prompt) + len(tokens) - 1, vocab]
    cached_tokens: int = 0          # leading prompt tokens found in the KV cache, not computed (first admission)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def record(self, step: ScheduledStep, row: int, sequence: SequenceState, out: StepOutput) -> None:
        """Row row of out is sequence's next token (and, when asked, its log-probabilities)."""
        request = sequence.request
        token, prompt_len = int(out.tokens[row]), len(request.prompt)
        # a preempted sequence's prefill computes its prompt again: its log-probabilities are recorded already
        first = step.kind == "prefill" and not sequence.tokens
        computed = len(step.tokens[row])  # a prefill's prompt, with a preempted sequence's tokens
        sequence.tokens.append(token)
        if request.logprobs:
            if first:
                sequence.logprobs += out.prompt_logprobs[row, :prompt_len - 1].tolist()
            sequence.logprobs.append(float(out.logprobs[row]))
        if request.full_logprobs:
            # prefill: rows 0..len-1 predict prompt tokens 1.. and the first new token; decode: one row
            rows = slice(0, prompt_len) if first else slice(computed - 1, computed) if step.kind == "prefill" \
                else slice(0, 1)
            sequence.rows.append(out.full_logprobs[row, rows].clone())
        if sequence.on_token is not None:
            sequence.on_token(token)

    def finish_reason(self, sequence: SequenceState) -> Optional[str]:
        if sequence.request.stop.reached(sequence.tokens, self.tokenizer):
            return "stop"
        return "length" if len(sequence.tokens) >= sequence.request.max_new_tokens else None

    def finish(self, sequence: SequenceState, reason: str) -> None:
        request = sequence.request
        rows = torch.cat(sequence.rows) if request.full_logprobs else None
        result = SequenceResult(list(request.prompt), sequence.tokens, reason,
                              sequence.logprobs if request.logprobs else None, rows, sequence.prompt_cached)
        try:
            sequence.future.set_result(result)
        except InvalidStateError:  # cancelled by its client meanwhile: nobody is waiting
            pass

    @staticmethod
    def fail(sequence: SequenceState, error: Exception) -> None:
        try:
            sequence.future.set_exception(error)
        except InvalidStateError:
            pass
