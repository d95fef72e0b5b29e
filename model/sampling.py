"""Next-token choice from fp32 logits [n, vocab], per row, in NeMo's order.

First what applies to every row, greedy ones too (vLLM's order): the grammar's allowed tokens (a bitmask),
OpenAI's logit_bias, presence and frequency penalties over the tokens generated so far, ban_eos. Then greedy
argmax, or: / temperature, repetition penalty (NeMo's, over prompt + generated), top-k, top-p, softmax,
multinomial with the row's own torch.Generator when it has one (so a seeded request does not depend on its
batch neighbours). Every function is pure apart from the generators' state.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch


def ban_tokens(logits: torch.Tensor, rows: torch.Tensor, token: int) -> torch.Tensor:
    """logits[rows, token] = -inf for the boolean rows [n]."""
    out = logits.clone()
    out[rows, token] = float("-inf")
    return out


def history_mask(history: torch.Tensor, history_len: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [n, vocab]: which ids occur among the first history_len[i] entries of history[i] [n, T]."""
    valid = torch.arange(history.shape[1], device=history.device) < history_len[:, None]  # [n, T]
    ids = torch.where(valid, history, vocab)  # unused entries land in a spare column
    seen = torch.zeros(history.shape[0], vocab + 1, dtype=torch.bool, device=history.device)
    return seen.scatter_(1, ids, True)[:, :vocab]


def generated_counts(history: torch.Tensor, start: torch.Tensor, end: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 [n, vocab]: how often each id occurs among entries [start[i], end[i]) of history[i] [n, T]."""
    position = torch.arange(history.shape[1], device=history.device)
    inside = (position >= start[:, None]) & (position < end[:, None])
    ids = torch.where(inside, history, vocab)  # entries outside land in a spare column
    counts = torch.zeros(history.shape[0], vocab + 1, device=history.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))[:, :vocab]


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's: logit - frequency[i] * count - presence[i] * (count > 0), counts from generated_counts."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_logit_bias(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """logits[i, ids[i, j]] += values[i, j]; ids [n, K] padded with -1 (no bias)."""
    vocab = logits.shape[-1]
    bias = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
    bias.scatter_add_(1, torch.where(ids >= 0, ids, vocab), values.to(logits.dtype))
    return logits + bias[:, :vocab]


def allowed_tokens(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [n, vocab] from an int32 bitmask [n, ceil(vocab / 32)]: bit b of word w allows token 32 w + b (the
    layout of llguidance and xgrammar)."""
    bits = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab]


def apply_token_mask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """-inf wherever the bitmask words [n, W] do not allow the token."""
    return logits.masked_fill(~allowed_tokens(words, logits.shape[-1]), float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """CTRL-style: a seen token's logit is divided by penalty [n] when positive, multiplied when not."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k[i] largest logits (ties with the k-th kept); 0 keeps all."""
    k = top_k.clamp(max=logits.shape[1])  # top_k >= 0: the schema's bound
    kth = logits.sort(dim=1, descending=True).values.gather(1, (k - 1).clamp(min=0)[:, None])  # [n, 1]
    drop = (logits < kth) & (k > 0)[:, None]
    return logits.masked_fill(drop, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens up to and including the first one whose cumulative probability crosses
    top_p[i]; 0 or 1 keeps all."""
    ordered, order = logits.sort(dim=1, descending=True)
    probs = ordered.softmax(dim=1)
    before = probs.cumsum(dim=1) - probs  # probability mass ranked above each token
    active = (top_p > 0) & (top_p < 1)
    drop_sorted = (before > top_p[:, None]) & active[:, None]
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def multinomial(probs: torch.Tensor, generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One draw per row [n]; rows with a generator use it, the others share the default generator."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        index = _to(probs.device, torch.tensor(shared))
        out[index] = torch.multinomial(probs.index_select(0, index), 1).squeeze(1)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=g).squeeze()
    return out


def sample(logits: torch.Tensor, *, greedy: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, repetition_penalty: torch.Tensor, seen: Optional[torch.Tensor],
           generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """Token ids [n] from logits [n, vocab] (already -inf where banned), on logits' device. The settings [n]
    are the plan's CPU tensors, so which rows sample is known without waiting for the device. seen:
    history_mask on the device, or None when no row has a repetition penalty."""
    tokens = logits.argmax(dim=1)
    rows = (~greedy.cpu()).nonzero().squeeze(1)
    if not rows.numel():
        return tokens
    device = logits.device
    index = _to(device, rows)

    def chosen(setting: torch.Tensor) -> torch.Tensor:
        return _to(device, setting.cpu()[rows])

    x = logits.index_select(0, index) / chosen(temperature)[:, None]
    if seen is not None:
        x = apply_repetition_penalty(x, chosen(repetition_penalty), seen.index_select(0, index))
    # each a sort of the rows' whole vocabulary: only when some row asks (decided on the plan's CPU copies)
    if (top_k.cpu()[rows] > 0).any():
        x = apply_top_k(x, chosen(top_k))
    p = top_p.cpu()[rows]
    if ((p > 0) & (p < 1)).any():
        x = apply_top_p(x, chosen(top_p))
    tokens[index] = multinomial(x.softmax(dim=1), [generators[i] for i in rows.tolist()])
    return tokens


def _to(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor onto the device without waiting: the copy is queued before the kernels that read it."""
    return tensor.to(device, non_blocking=True)
