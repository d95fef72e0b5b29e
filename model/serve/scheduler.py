"""Which sequences run next, in which KV-cache slots, and whether as a prefill or a decode step.

The scheduler is plain Python (no torch): it holds the queue of waiting sequences and each lane's active
slots, and turns them into ScheduledSteps, lists of token ids and positions. The engine turns a step into the
model runner's StepPlan (engine.py) and gives the step's results to output processing (output.py).

The KV-cache slots are split into lanes, one per pipeline stage (model/generate.py); each lane has at most one
step in flight. A lane's next step admits waiting sequences into its free slots when there are both (a
prefill), else advances its active sequences by one token (a decode): admitting comes first, so that a freed
slot is refilled at once.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional


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

    @property
    def slots(self) -> list[int]:
        return [s.slot for s in self.sequences]


class Scheduler:
    def __init__(self, lanes: Sequence[range], max_prefill_tokens: int):
        self.lanes = list(lanes)
        self.max_prefill_tokens = max_prefill_tokens   # rows × width of one prefill step
        self.waiting: deque[SequenceState] = deque()
        self.active: dict[int, SequenceState] = {}     # slot -> sequence

    def add(self, sequence: SequenceState) -> None:
        self.waiting.append(sequence)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def drop_cancelled(self) -> None:
        """A cancelled sequence leaves at once, freeing its slot; a step in flight with its row lands without
        it (is_running)."""
        self.waiting = deque(s for s in self.waiting if not s.future.cancelled())
        for slot in [slot for slot, s in self.active.items() if s.future.cancelled()]:
            del self.active[slot]

    def is_running(self, sequence: SequenceState) -> bool:
        return self.active.get(sequence.slot) is sequence

    def finish(self, sequence: SequenceState) -> None:
        del self.active[sequence.slot]

    def every_sequence(self) -> Iterator[SequenceState]:
        yield from self.waiting
        yield from self.active.values()

    def clear(self) -> None:
        self.waiting.clear()
        self.active.clear()

    def next_step(self, lane: int) -> Optional[ScheduledStep]:
        slots = self.lanes[lane]
        free = [slot for slot in slots if slot not in self.active]
        if self.waiting and free:
            return self._prefill(lane, free)
        running = [self.active[slot] for slot in slots if slot in self.active]
        if not running:
            return None
        return ScheduledStep("decode", lane, running, [[s.tokens[-1]] for s in running],
                             [s.length - 1 for s in running])

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
        if not going_on:
            return None
        return ScheduledStep("decode", step.lane, going_on, [[0] for _ in going_on], [s.length for s in going_on],
                             ahead=1)

    def _prefill(self, lane: int, free: list[int]) -> ScheduledStep:
        """As many waiting sequences as fit the free slots and the step's token budget (rows × the widest
        prompt), in arrival order; the first always fits."""
        admitted: list[SequenceState] = []
        width = 0
        while self.waiting and len(admitted) < len(free):
            wider = max(width, len(self.waiting[0].request.prompt))
            if admitted and wider * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            admitted.append(self.waiting.popleft())
            width = wider
        for sequence, slot in zip(admitted, free):
            sequence.slot = slot
            self.active[slot] = sequence
        prompts = [list(s.request.prompt) for s in admitted]
        return ScheduledStep("prefill", lane, admitted, prompts, [len(p) for p in prompts])
