"""How a replica's leader tells its other ranks what to run: commands that flow down the pipeline.

The leader broadcasts each command to the tensor ranks of its stage, and every rank of a stage that is not the
last passes it on to its own rank of the next stage, the way activations go, without waiting for that rank to
take it. So a stage that has finished one step takes the next command at once while the next stage still
runs the last step: what lets the engine keep a step of every lane in flight (generate.py, engine.py). An idle
follower blocks in the receive (the process group's timeout is long), so there is no polling and no pickling.

Every command is one header (int64 [HEADER_SIZE]); a step adds one payload whose shape the header gives,
int64 [n, PARAMS + width]:

    slots, lengths, top_k, seed, greedy, ban_eos, temperature, top_p, repetition_penalty, tokens[width]

The three float32 columns travel as their bit patterns so that one message carries the whole plan.
"""
from __future__ import annotations

from collections import deque
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


class Commands:
    """One rank's end of the command flow."""

    def __init__(self, ps: ParallelState):
        self.ps = ps
        self._passing_on: deque[tuple[object, torch.Tensor]] = deque()  # sends to the next stage under way

    def send_step(self, plan: StepPlan) -> None:
        """Leader: make every other rank of the replica run this plan next."""
        n, width = plan.tokens.shape
        if self._give([STEP, KINDS.index(plan.kind), n, width, int(plan.logprobs), int(plan.full_logprobs)]):
            self._give_tensor(pack(plan))

    def send_shutdown(self) -> None:
        """Leader: release every other rank from its loop."""
        self._give([SHUTDOWN, 0, 0, 0, 0, 0])
        self.close()

    def send_idle(self) -> None:
        """Leader: nothing to run yet. Followers wait for commands in a receive, which would fail at the process
        group's timeout: an idle leader sends this well within it, so that idle waits are unbounded."""
        self._give([IDLE, 0, 0, 0, 0, 0])

    def receive(self) -> Optional[StepPlan]:
        """Follower: block until the leader's next command; the plan to run, or None on shutdown."""
        command = IDLE
        while command == IDLE:
            header = self._take(torch.zeros(HEADER_SIZE, dtype=torch.long)).tolist()
            command, kind, n, width, logprobs, full_logprobs = header
        if command == SHUTDOWN:
            self.close()
            return None
        if command != STEP:
            raise RuntimeError(f"protocol: unknown command {command} from rank {self.ps.first_rank}")
        payload = self._take(torch.zeros(n, PARAMS + width, dtype=torch.long))
        return unpack(payload, KINDS[kind], bool(logprobs), bool(full_logprobs))

    def close(self) -> None:
        """Wait until the next stage has taken everything passed on to it."""
        while self._passing_on:
            self._passing_on.popleft()[0].wait()

    def _give(self, header: list[int]) -> bool:
        """Leader: a header to the replica; False when the replica has no other rank."""
        if len(self.ps.replica_ranks) == 1:
            return False
        self._give_tensor(torch.tensor(header))
        return True

    def _give_tensor(self, x: torch.Tensor) -> None:
        on_device = x.to(self.ps.device)  # NCCL needs it on the device
        if self.ps.tp_size > 1:
            dist.broadcast(on_device, src=self.ps.first_rank, group=self.ps.tp_group)
        self._pass_on(on_device)

    def _take(self, empty: torch.Tensor) -> torch.Tensor:
        """Follower: the next command tensor, from the leader (first stage) or the previous stage."""
        x = empty.to(self.ps.device)
        if self.ps.is_first_stage:
            dist.broadcast(x, src=self.ps.first_rank, group=self.ps.tp_group)
        else:
            dist.recv(x, self.ps.prev_rank)
        self._pass_on(x)
        return x.cpu()

    def _pass_on(self, x: torch.Tensor) -> None:
        if self.ps.is_last_stage:
            return
        while self._passing_on and self._passing_on[0][0].is_completed():
            self._passing_on.popleft()
        self._passing_on.append((dist.isend(x, self.ps.next_rank), x))


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
