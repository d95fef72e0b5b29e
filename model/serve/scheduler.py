"""Which sequences run next, in which KV-cache slots, and whether as a prefill or a decode step.

The scheduler is plain Python (no torch): it holds the queue of waiting sequences and each lane's active
slots, and turns them into ScheduledSteps, lists of token ids and positions. The engine turns a step into the
model runner's StepPlan (engine.py) and gives the step's results to output processing (output.py).

The KV-cache slots are split into lanes, one per pipeline stage (model/generate.py); each lane has at most one
step in flight. A lane's next step admits waiting sequences into its free slots when there are both (a
prefill), else advances its active sequences by one token (a decode): admitting comes first, so that a freed
slot is refilled at once.

Slots only cap how many sequences run at once (model.max_batch); the cache's memory is its blocks
(kv_blocks.py). A sequence is admitted when the blocks its prompt needs are free (less the longest cached
prefix of it, which it shares and does not compute again), and takes a block more whenever its decode crosses
into one. When none is left, the sequence admitted last is preempted (vLLM's recompute): its blocks go back,
it waits first in line, and on admission again its prompt and generated tokens are prefilled as one prompt.
The same tokens come out: nothing fails for want of blocks.

A full block's keys are registered for reuse as soon as the step that writes it is scheduled: every stage
runs steps in order, and within a step every row stores before any reads (model/transformer.py), so a later
row, or a later step, that shares it reads what was written. The samples of one request, admitted into one
prefill, so compute their prompt once.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

from fleetgen.model.serve.kv_blocks import BlockManager


@dataclass(eq=False)
class SequenceState:
    """One sequence from submission to its result. request is the engine's SequenceRequest (its prompt and
    max_new_tokens are what the scheduler reads)."""
    request: Any
    future: Future
    on_token: Optional[Callable[[int], None]] = None
    slot: int = -1
    tokens: list = field(default_factory=list)     # generated so far
    logprobs: list = field(default_factory=list)
    rows: list = field(default_factory=list)       # full log-softmax blocks, [k, vocab] each
    grammar: Any = None                            # a constrained sequence's matcher (grammar.py)
    admission: int = 0                             # which admission this is, counted over the scheduler's life
    cached: int = 0                                # prompt tokens found in the cache at admission
    prompt_cached: int = 0                         # ditto at its first admission (a preempted one is admitted again)

    @property
    def wants_every_logit(self) -> bool:
        """Log-probabilities of every prompt token: computed, never read from the cache."""
        return self.request.logprobs or self.request.full_logprobs

    @property
    def context(self) -> list[int]:
        """What a prefill computes: the prompt and, for a preempted sequence, what it generated so far."""
        return list(self.request.prompt) + self.tokens

    @property
    def length(self) -> int:
        """Tokens in the cache once the last generated token is fed: the decode position of that token + 1."""
        return len(self.request.prompt) + len(self.tokens)


@dataclass
class ScheduledStep:
    kind: str                          # "prefill" | "decode"
    lane: int
    sequences: list[SequenceState]     # in row order
    tokens: list[list[int]]            # prefill: each prompt; decode: [the last generated token] each
    lengths: list[int]                 # prefill: prompt lengths; decode: the position of that token
    ahead: int = 0                     # 1: scheduled before the step feeding it landed (decode_after)
    admissions: list[int] = field(default_factory=list)  # each sequence's admission when scheduled

    @property
    def slots(self) -> list[int]:
        return [s.slot for s in self.sequences]


class Scheduler:
    def __init__(self, lanes: Sequence[range], max_prefill_tokens: int, blocks: BlockManager):
        self.lanes = list(lanes)
        self.max_prefill_tokens = max_prefill_tokens   # rows × computed width of one prefill step
        self.blocks = blocks
        self.waiting: deque[SequenceState] = deque()
        self.active: dict[int, SequenceState] = {}     # slot -> sequence
        self.admissions = 0
        self.preemptions = 0

    def add(self, sequence: SequenceState) -> None:
        self.waiting.append(sequence)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def drop_cancelled(self) -> None:
        """A cancelled sequence leaves at once, freeing its slot; a step in flight with its row lands without
        it (is_running)."""
        self.waiting = deque(s for s in self.waiting if not s.future.cancelled())
        for sequence in [s for s in self.active.values() if s.future.cancelled()]:
            self.finish(sequence)

    def is_running(self, sequence: SequenceState) -> bool:
        return self.active.get(sequence.slot) is sequence

    def is_current(self, step: ScheduledStep, row: int) -> bool:
        """Whether row of a landed step still belongs to its sequence: not cancelled, finished or preempted since
        it was scheduled (a preempted sequence may run again, from a later admission)."""
        sequence = step.sequences[row]
        return self.is_running(sequence) and sequence.admission == step.admissions[row]

    def finish(self, sequence: SequenceState) -> None:
        del self.active[sequence.slot]
        self.blocks.free(sequence)

    def every_sequence(self) -> Iterator[SequenceState]:
        yield from self.waiting
        yield from self.active.values()

    def clear(self) -> None:
        for sequence in list(self.active.values()):
            self.finish(sequence)
        self.waiting.clear()

    def next_step(self, lane: int) -> Optional[ScheduledStep]:
        slots = self.lanes[lane]
        free = [slot for slot in slots if slot not in self.active]
        if self.waiting and free and (step := self._prefill(lane, free)) is not None:
            return step
        running = self._grown([self.active[slot] for slot in slots if slot in self.active])
        if not running:
            return None
        for sequence in running:
            self._register(sequence)
        return self._step("decode", lane, running, [[s.tokens[-1]] for s in running],
                          [s.length - 1 for s in running])

    def _grown(self, running: list[SequenceState]) -> list[SequenceState]:
        """running, each with the blocks for the token its decode stores; a sequence that cannot have them
        preempts the sequence admitted last (itself, when that is it) until it can."""
        grown = []
        for sequence in running:
            while self.is_running(sequence) and not self.blocks.grow(sequence, sequence.length):
                victim = max(self.active.values(), key=lambda s: s.admission)
                self._preempt(victim)
                grown = [s for s in grown if s is not victim]
            if self.is_running(sequence):
                grown.append(sequence)
        return grown

    def _preempt(self, sequence: SequenceState) -> None:
        """vLLM's recompute: its blocks go back and it waits, first in line; a step in flight with its row
        lands without it (is_current)."""
        self.finish(sequence)
        sequence.slot = -1
        self.waiting.appendleft(sequence)
        self.preemptions += 1

    def _register(self, sequence: SequenceState) -> None:
        """The step being scheduled stores sequence's context (its length): its full blocks are findable for
        reuse from now on. Only when one more is full: a decode step builds no list of the whole context."""
        table = self.blocks.tables[sequence]
        if self.blocks.prefix_caching and len(table.keys) < sequence.length // self.blocks.block_size:
            self.blocks.written(sequence, sequence.context)

    def _step(self, kind: str, lane: int, sequences: list[SequenceState], tokens: list[list[int]],
              lengths: list[int], ahead: int = 0) -> ScheduledStep:
        return ScheduledStep(kind, lane, sequences, tokens, lengths, ahead, [s.admission for s in sequences])

    def decode_after(self, step: ScheduledStep) -> Optional[ScheduledStep]:
        """The decode step that follows step while step is still in flight, its tokens fed on the device
        (model/generate.py launch(feed=)): so that the host schedules step t + 1 while the device runs step t.
        Its sequences are step's that will still run by their token budget; one that step's token stops
        (a stop token or string, known only once step lands) loses the row's extra token. None when step
        is not every running sequence of its lane, when waiting sequences could be admitted instead, when a
        sequence is constrained (its grammar's mask needs the token step samples), or when nothing would run."""
        lane = self.lanes[step.lane]
        running = [s for s in step.sequences if self.is_running(s)]
        if len(running) != sum(slot in self.active for slot in lane):
            return None
        if self.waiting and len(running) < len(lane):
            return None
        if any(s.grammar is not None for s in running):
            return None
        going_on = [s for s in running if len(s.tokens) + 1 < s.request.max_new_tokens]
        # its token's block, without preempting: a sequence that needs one waits for the next ordinary step
        if not going_on or not all(self.blocks.grow(s, s.length + 1) for s in going_on):
            return None
        return self._step("decode", step.lane, going_on, [[0] for _ in going_on], [s.length for s in going_on],
                          ahead=1)

    def _prefill(self, lane: int, free: list[int]) -> Optional[ScheduledStep]:
        """As many waiting sequences as fit the free slots, the free blocks and the step's token budget (rows ×
        the widest part of a prompt not in the cache), in arrival order; the first fits the budget always, the
        blocks when the cache has them. None when not one is admitted."""
        admitted: list[SequenceState] = []
        width = 0
        while self.waiting and len(admitted) < len(free):
            sequence = self.waiting[0]
            context = sequence.context
            reuse = not sequence.wants_every_logit
            wider = max(width, len(context) - (self.blocks.cached_prefix(context) if reuse else 0))
            if admitted and wider * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            cached = self.blocks.admit(sequence, context, len(context), reuse=reuse)
            if cached is None:
                break
            self.waiting.popleft()
            self._register(sequence)
            self.admissions += 1
            sequence.slot, sequence.cached, sequence.admission = free[len(admitted)], cached, self.admissions
            if not sequence.tokens:
                sequence.prompt_cached = cached
            self.active[sequence.slot] = sequence
            admitted.append(sequence)
            width = wider
        if not admitted:
            return None
        contexts = [s.context for s in admitted]
        return self._step("prefill", lane, admitted, contexts, [len(c) for c in contexts])
