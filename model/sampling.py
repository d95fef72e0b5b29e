"""Next-token choice from fp32 logits [n, vocab], per row, in NeMo's order.

ban_eos -> greedy argmax, or: / temperature, repetition penalty, top-k, top-p, softmax, multinomial with the
row's own torch.Generator when it has one (so a seeded request does not depend on its batch neighbours).
Every function is pure apart from the generators' state.
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
    x = apply_top_p(apply_top_k(x, chosen(top_k)), chosen(top_p))
    tokens[index] = multinomial(x.softmax(dim=1), [generators[i] for i in rows.tolist()])
    return tokens


def _to(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor onto the device without waiting: the copy is queued before the kernels that read it."""
    return tensor.to(device, non_blocking=True)
