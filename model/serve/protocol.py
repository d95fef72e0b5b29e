"""How a replica's leader tells its followers what to run: fixed-layout tensors broadcast over the replica.

Every command is one header broadcast (int64 [HEADER_SIZE]); a step adds one payload broadcast whose shape
the header gives. An idle follower simply blocks in the header broadcast (the process group's timeout is
long), so there is no polling and no pickling. Layout of a step's payload, int64 [n, PARAMS + width]:

    slots, lengths, top_k, seed, greedy, ban_eos, temperature, top_p, repetition_penalty, tokens[width]

The three float32 columns travel as their bit patterns so that one broadcast carries the whole plan.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from fleetgen.model.generate import StepPlan
from fleetgen.model.parallel import ParallelState

STEP, SHUTDOWN, IDLE = 1, 2, 3
KINDS = ("prefill", "decode")
HEADER_SIZE = 6  # command, kind, n, width, logprobs, full_logprobs
INT_COLUMNS = ("slots", "lengths", "top_k", "seed", "greedy", "ban_eos")
FLOAT_COLUMNS = ("temperature", "top_p", "repetition_penalty")
PARAMS = len(INT_COLUMNS) + len(FLOAT_COLUMNS)


def send_step(plan: StepPlan, ps: ParallelState) -> None:
    """Leader: make every follower of the replica run generator.step(plan) next."""
    if len(ps.replica_ranks) == 1:
        return
    n, width = plan.tokens.shape
    header = [STEP, KINDS.index(plan.kind), n, width, int(plan.logprobs), int(plan.full_logprobs)]
    _broadcast(torch.tensor(header), ps)
    _broadcast(pack(plan), ps)


def send_shutdown(ps: ParallelState) -> None:
    """Leader: release every follower from its loop."""
    if len(ps.replica_ranks) > 1:
        _broadcast(torch.tensor([SHUTDOWN, 0, 0, 0, 0, 0]), ps)


def send_idle(ps: ParallelState) -> None:
    """Leader: nothing to run yet. Followers wait for commands in a broadcast, which would fail at the process
    group's timeout: an idle leader sends this well within it, so that idle waits are unbounded."""
    if len(ps.replica_ranks) > 1:
        _broadcast(torch.tensor([IDLE, 0, 0, 0, 0, 0]), ps)


def receive(ps: ParallelState) -> Optional[StepPlan]:
    """Follower: block until the leader's next command; the plan to run, or None on shutdown."""
    command = IDLE
    while command == IDLE:
        header = _broadcast(torch.zeros(HEADER_SIZE, dtype=torch.long), ps).tolist()
        command, kind, n, width, logprobs, full_logprobs = header
    if command == SHUTDOWN:
        return None
    if command != STEP:
        raise RuntimeError(f"protocol: unknown command {command} from rank {ps.first_rank}")
    payload = _broadcast(torch.zeros(n, PARAMS + width, dtype=torch.long), ps)
    return unpack(payload, KINDS[kind], bool(logprobs), bool(full_logprobs))


def pack(plan: StepPlan) -> torch.Tensor:
    """int64 [n, PARAMS + width]: the plan's per-row tensors side by side."""
    ints = [getattr(plan, name).long() for name in INT_COLUMNS]
    floats = [_float_bits(getattr(plan, name)) for name in FLOAT_COLUMNS]
    return torch.cat([torch.stack(ints + floats, dim=1), plan.tokens.long()], dim=1)


def unpack(payload: torch.Tensor, kind: str, logprobs: bool, full_logprobs: bool) -> StepPlan:
    columns = dict(zip(INT_COLUMNS + FLOAT_COLUMNS, payload[:, :PARAMS].unbind(1)))
    for name in FLOAT_COLUMNS:
        columns[name] = _bits_float(columns[name])
    for name in ("greedy", "ban_eos"):
        columns[name] = columns[name].bool()
    return StepPlan(kind=kind, tokens=payload[:, PARAMS:].contiguous(), logprobs=logprobs,
                    full_logprobs=full_logprobs, **{k: v.contiguous() for k, v in columns.items()})


def _float_bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32).long()


def _bits_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int32).view(torch.float32)


def _broadcast(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Leader's tensor to every rank of the replica; CPU in and out (NCCL needs it on the device)."""
    on_device = x.to(ps.device)
    dist.broadcast(on_device, src=ps.first_rank, group=ps.replica_group)
    return on_device.cpu()
