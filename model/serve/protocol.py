"""How a replica's leader tells its other ranks what to run: commands that flow down the pipeline.

The leader broadcasts each command to the tensor ranks of its stage, and every rank of a stage that is not the
last passes it on to its own rank of the next stage, over the pipeline group (its own connections, apart from
the activations), without waiting for that rank to take it. So a stage that has finished one step takes the
next command at once while the next stage still runs the last step: what lets the engine keep a step of every
lane in flight (generate.py, engine.py). A later stage has the receive of its next command posted before that
command is sent, so taking it costs no round trip. An idle follower blocks in the receive (the process
group's timeout is long): no polling, no pickling.

A command is an envelope, int64 [HEADER_SIZE + inline_rows * (PARAMS + 1 + inline_blocks)]: the header, then a
decode step's payload when it fits; a wider step's payload follows as a message of its own. A payload is int64
[n, PARAMS + width + 2 * bias_width + ceil(mask_words / 2) + table_width]:

    slots, lengths, top_k, seed, greedy, ban_eos, starts, resumed, temperature, top_p, repetition_penalty,
    presence_penalty, frequency_penalty, tokens[width], bias_ids[bias_width], bias_values[bias_width],
    token_mask, blocks[table_width]

The float32 columns travel as their bit patterns and the grammar's int32 mask words two to a column, so that
one message carries the whole plan. The header says which of the plan's optional parts (the penalties, logit_bias, the
grammar's mask) it has; a step without them sends no column of theirs beyond the two penalty columns.
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
HEADER_SIZE = 10  # command, kind, n, width, logprobs, full_logprobs, penalties, bias_width, mask_words, table_width
INT_COLUMNS = ("slots", "lengths", "top_k", "seed", "greedy", "ban_eos", "starts", "resumed")
FLOAT_COLUMNS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
PARAMS = len(INT_COLUMNS) + len(FLOAT_COLUMNS)


class Commands:
    """One rank's end of the command flow. inline_rows: the most rows a decode payload carried in the envelope
    (the engine's slot count); inline_blocks: the widest block table it carries for them."""

    def __init__(self, ps: ParallelState, inline_rows: int, inline_blocks: int = 0):
        self.ps = ps
        self.alone = len(ps.replica_ranks) == 1  # a one-rank replica: the leader sends nothing
        self.envelope_size = HEADER_SIZE + inline_rows * (PARAMS + 1 + inline_blocks)
        self._passing_on: deque[tuple[object, torch.Tensor]] = deque()  # sends to the next stage under way
        self._next: Optional[tuple[object, torch.Tensor]] = None        # later stages: the posted receive

    def send_step(self, plan: StepPlan) -> None:
        """Leader: make every other rank of the replica run this plan next."""
        if self.alone:
            return
        n, width = plan.tokens.shape
        payload = pack(plan)
        header = [STEP, KINDS.index(plan.kind), n, width, int(plan.logprobs), int(plan.full_logprobs),
                  int(plan.presence_penalty is not None), _width(plan.bias_ids), _width(plan.token_mask),
                  _width(plan.blocks)]
        inline = self._inline(n, payload.shape[1])
        self._give(self._envelope(header, payload if inline else None))
        if not inline:
            self._give(payload)

    def send_shutdown(self) -> None:
        """Leader: release every other rank from its loop."""
        if not self.alone:
            self._give(self._envelope([SHUTDOWN] + [0] * (HEADER_SIZE - 1)))
            self.close()

    def send_idle(self) -> None:
        """Leader: nothing to run yet. Followers wait for commands in a receive, which would fail at the process
        group's timeout: an idle leader sends this well within it, so that idle waits are unbounded."""
        if not self.alone:
            self._give(self._envelope([IDLE] + [0] * (HEADER_SIZE - 1)))

    def receive(self) -> Optional[StepPlan]:
        """Follower: block until the leader's next command; the plan to run, or None on shutdown."""
        command = IDLE
        while command == IDLE:
            envelope = self._take_envelope()
            header = envelope[:HEADER_SIZE].tolist()
            command, kind, n, width, logprobs, full_logprobs, penalties, bias_width, mask_words, table_width = header
        if command == SHUTDOWN:
            self.close()
            return None
        if command != STEP:
            raise RuntimeError(f"protocol: unknown command {command} from rank {self.ps.first_rank}")
        columns = PARAMS + width + 2 * bias_width + -(-mask_words // 2) + table_width
        if self._inline(n, columns):
            payload = envelope[HEADER_SIZE:HEADER_SIZE + n * columns].view(n, columns)
        else:
            payload = self._take(torch.zeros(n, columns, dtype=torch.long))
        self._post_next()  # after the payload: the pipeline group's messages arrive in the order posted
        return unpack(payload, KINDS[kind], bool(logprobs), bool(full_logprobs), width, bool(penalties),
                      bias_width, mask_words, table_width)

    def close(self) -> None:
        """Wait until the next stage has taken everything passed on to it."""
        while self._passing_on:
            self._passing_on.popleft()[0].wait()

    def _inline(self, n: int, columns: int) -> bool:
        return HEADER_SIZE + n * columns <= self.envelope_size

    def _envelope(self, header: list[int], payload: Optional[torch.Tensor] = None) -> torch.Tensor:
        envelope = torch.zeros(self.envelope_size, dtype=torch.long)
        envelope[:HEADER_SIZE] = torch.tensor(header)
        if payload is not None:
            envelope[HEADER_SIZE:HEADER_SIZE + payload.numel()] = payload.flatten()
        return envelope

    def _give(self, x: torch.Tensor) -> None:
        """Leader: a command tensor to the rest of the replica."""
        on_device = x.to(self.ps.device)  # NCCL needs it on the device
        if self.ps.tp_size > 1:
            dist.broadcast(on_device, src=self.ps.first_rank, group=self.ps.tp_group)
        self._pass_on(on_device)

    def _take_envelope(self) -> torch.Tensor:
        if self.ps.is_first_stage:
            return self._take(torch.zeros(self.envelope_size, dtype=torch.long))
        if self._next is None:
            self._post_next()
        work, envelope = self._next
        self._next = None
        work.wait()
        self._pass_on(envelope)
        return envelope.cpu()

    def _post_next(self) -> None:
        if not self.ps.is_first_stage:
            envelope = torch.zeros(self.envelope_size, dtype=torch.long, device=self.ps.device)
            self._next = (dist.irecv(envelope, self.ps.prev_rank, group=self.ps.pp_group), envelope)

    def _take(self, empty: torch.Tensor) -> torch.Tensor:
        """Follower: the next command tensor, from the leader (first stage) or the previous stage."""
        x = empty.to(self.ps.device)
        if self.ps.is_first_stage:
            dist.broadcast(x, src=self.ps.first_rank, group=self.ps.tp_group)
        else:
            dist.recv(x, self.ps.prev_rank, group=self.ps.pp_group)
        self._pass_on(x)
        return x.cpu()

    def _pass_on(self, x: torch.Tensor) -> None:
        if self.ps.is_last_stage:
            return
        while self._passing_on and self._passing_on[0][0].is_completed():
            self._passing_on.popleft()
        self._passing_on.append((dist.isend(x, self.ps.next_rank, group=self.ps.pp_group), x))


def pack(plan: StepPlan) -> torch.Tensor:
    """int64 [n, columns]: the plan's per-row tensors side by side (the module's docstring)."""
    n = plan.n
    ints = [_or_zeros(getattr(plan, name), n).long() for name in INT_COLUMNS]
    floats = [_float_bits(_or_zeros(getattr(plan, name), n)) for name in FLOAT_COLUMNS]
    parts = [torch.stack(ints + floats, dim=1), plan.tokens.long()]
    if plan.bias_ids is not None:
        parts += [plan.bias_ids.long(), _float_bits(plan.bias_values)]
    if plan.token_mask is not None:
        words = plan.token_mask.shape[1]
        even = torch.nn.functional.pad(plan.token_mask, (0, words % 2)).contiguous()
        parts.append(even.view(torch.int64))
    if plan.blocks is not None:
        parts.append(plan.blocks.long())
    return torch.cat(parts, dim=1)


def unpack(payload: torch.Tensor, kind: str, logprobs: bool, full_logprobs: bool, width: int, penalties: bool,
           bias_width: int, mask_words: int, table_width: int = 0) -> StepPlan:
    columns = dict(zip(INT_COLUMNS + FLOAT_COLUMNS, payload[:, :PARAMS].unbind(1)))
    for name in FLOAT_COLUMNS:
        columns[name] = _bits_float(columns[name])
    for name in ("greedy", "ban_eos"):
        columns[name] = columns[name].bool()
    if not penalties:
        columns["presence_penalty"] = columns["frequency_penalty"] = None
    for name in ("starts", "resumed"):  # zeros mean what None does
        if kind != "prefill" or not columns[name].any():
            columns[name] = None
    start = PARAMS + width
    bias = payload[:, start:start + 2 * bias_width]
    mask_end = payload.shape[1] - table_width
    mask = payload[:, start + 2 * bias_width:mask_end]
    optional = {}
    if table_width:
        optional["blocks"] = payload[:, mask_end:].contiguous()
    if bias_width:
        optional.update(bias_ids=bias[:, :bias_width].contiguous(), bias_values=_bits_float(bias[:, bias_width:]))
    if mask_words:
        optional["token_mask"] = mask.contiguous().view(torch.int32)[:, :mask_words].contiguous()
    return StepPlan(kind=kind, tokens=payload[:, PARAMS:start].contiguous(), logprobs=logprobs,
                    full_logprobs=full_logprobs, **optional,
                    **{k: v if v is None else v.contiguous() for k, v in columns.items()})


def _width(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.shape[1]


def _or_zeros(x: Optional[torch.Tensor], n: int) -> torch.Tensor:
    return torch.zeros(n) if x is None else x


def _float_bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32).long()


def _bits_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int32).contiguous().view(torch.float32)
