"""Continuous batching on a replica's leader, and the loop its followers run.

The leader's step thread owns the generator. The KV-cache slots are split into lanes, one per pipeline stage
(generate.py). Each lane with no step in flight gets one: it either admits waiting sequences into its free
slots (a prefill step) or advances its active slots by one token (a decode step). Then the oldest step in
flight lands and the sequences that reached their token budget or a stop condition finish; a finished slot is
refilled by its lane's next step. So with two stages, one runs a step of lane 0 while the other runs lane 1's.
Every step goes to the other ranks (protocol.py) before it runs, since every rank runs every step.
HTTP handlers only submit sequences and wait on their futures; they never touch the model.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Optional

import torch

from fleetgen.model.serve import protocol
from fleetgen.model.checkpoint.source import Tokenizer
from fleetgen.model.config import ModelConfig
from fleetgen.model.generate import Flight, Generator, StepOutput, StepPlan, greedy_plan
from fleetgen.model.parallel import ParallelState

log = logging.getLogger(__name__)

MAX_PREFILL_TOKENS = 8192  # rows × width of one prefill step: bounds its activations and logits


@dataclass(frozen=True)
class Sampling:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 0 or 1 = off
    repetition_penalty: float = 1.0
    min_tokens: int = 0             # the end-of-document token is banned until this many tokens exist
    seed: Optional[int] = None


@dataclass(frozen=True)
class StopCondition:
    """A sequence ends when it generates one of token_ids, or when its generated text comes to contain one of
    strings (checked on every token, so only the newest token can have completed one)."""
    token_ids: frozenset = frozenset()
    strings: tuple = ()

    def reached(self, generated: list[int], tokenizer: Tokenizer) -> bool:
        if generated[-1] in self.token_ids:
            return True
        if not self.strings:
            return False
        # a character can take four byte-level tokens; a few more absorb a split character at the window's start
        window = 4 * max(len(s) for s in self.strings) + 4
        tail = tokenizer.decode(generated[-window:])
        return any(s in tail for s in self.strings)


@dataclass(frozen=True)
class SequenceRequest:
    prompt: tuple                   # token ids, BOS included when wanted
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop: StopCondition = StopCondition()
    logprobs: bool = False          # log-probabilities of every token after the first, prompt included
    full_logprobs: bool = False     # whole log-softmax rows at those positions


@dataclass
class SequenceResult:
    prompt: list[int]
    tokens: list[int]               # generated, the stopping token included
    finish_reason: str              # "stop" | "length"
    logprobs: Optional[list[float]] = None       # len(prompt) + len(tokens) - 1
    full_logprobs: Optional[torch.Tensor] = None  # [len(prompt) + len(tokens) - 1, vocab]


@dataclass
class _InFlight:
    lane: int
    flight: Flight
    sequences: list            # [_Sequence], in the plan's row order
    started: float             # time.monotonic() at launch


class EngineUnavailable(RuntimeError):
    """The engine is not running (stopped, or failed): a request cannot be served."""


@dataclass(eq=False)
class _Sequence:
    request: SequenceRequest
    future: Future
    on_token: Optional[Callable[[int], None]]
    slot: int = -1
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    rows: list = field(default_factory=list)    # full log-softmax blocks, [k, vocab] each


class Engine:
    def __init__(self, generator: Generator, tokenizer: Tokenizer, ps: ParallelState, config: ModelConfig,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS, idle_signal_s: Optional[float] = None):
        self.generator, self.tokenizer, self.ps, self.config = generator, tokenizer, ps, config
        self.eos_id: Optional[int] = config.eos_id
        self.vocab_size: int = config.vocab_size
        self.max_seq_len: int = generator.max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.error: Optional[str] = None            # why the step loop died, if it did
        self.step_started: Optional[float] = None   # monotonic launch time of the oldest step in flight (watchdog)
        self.idle_signal_s = idle_signal_s          # an idle leader tells its followers this often (protocol)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}     # slot -> sequence
        self._flights: deque[_InFlight] = deque()   # launched, not landed: oldest first, at most one a lane
        self._commands = protocol.Commands(ps, generator.max_batch)
        self._lock = threading.Lock()               # orders submissions against stop()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def warm_up(self) -> None:
        """Collective: one tiny prefill and decode on every rank, so a broken replica fails before serving."""
        token = self.eos_id or 0
        slots, lengths = torch.tensor([0]), torch.tensor([2])
        first = self.generator.step(greedy_plan("prefill", slots, torch.tensor([[token, token]]), lengths))
        self.generator.step(greedy_plan("decode", slots, first.tokens[:, None], lengths))

    def start(self) -> None:
        """Leader: start the step loop."""
        self._thread = threading.Thread(target=self._run, name="fleetgen-engine", daemon=True)
        self._thread.start()

    def follow(self) -> None:
        """Follower ranks: run the leader's steps until it sends shutdown, a step of every lane in flight."""
        flights: deque[Flight] = deque()
        while (plan := self._commands.receive()) is not None:
            flights.append(self.generator.launch(plan))
            if len(flights) == len(self.generator.lanes):
                self.generator.land(flights.popleft())
        while flights:
            self.generator.land(flights.popleft())

    def submit(self, request: SequenceRequest, on_token: Optional[Callable[[int], None]] = None) -> Future:
        """Queue one sequence (it waits for start() if need be); the future gets its SequenceResult.
        on_token(id) is called on the step thread for each new token. Cancelling the future frees the
        sequence's slot at the next step."""
        total = len(request.prompt) + request.max_new_tokens
        if not request.prompt or total > self.max_seq_len:
            raise ValueError(f"a sequence needs 1 to {self.max_seq_len} tokens in all, got a prompt of "
                             f"{len(request.prompt)} + {request.max_new_tokens} new tokens")
        with self._lock:
            if self._stopping or self.error:
                raise EngineUnavailable(self.error or "the engine has stopped")
            future: Future = Future()
            self._inbox.put(_Sequence(request, future, on_token))
            return future

    def stop(self) -> None:
        """Leader: fail what is still queued or running, release the followers, end the step loop."""
        with self._lock:
            already, self._stopping = self._stopping, True
        if self._thread is not None:
            self._inbox.put(None)  # wakes an idle loop, which sends the shutdown as it ends
            self._thread.join()
        elif not already:
            self._commands.send_shutdown()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if self.ps.device.type == "cuda":
            torch.cuda.set_device(self.ps.device)  # the current device is per thread; NCCL needs this rank's
        try:
            while not self._stopping:
                busy = self._waiting or self._active or self._flights
                if not self._take_submissions(block=not busy):
                    self._commands.send_idle()
                    continue
                self._drop_cancelled()
                self._launch_idle_lanes()
                if self._flights:
                    self._land_oldest()
            while self._flights:  # every rank runs what was launched before it hears the shutdown
                self._land_oldest()
            self._commands.send_shutdown()
            reason = "the server is shutting down"
        except Exception as e:  # a failed collective leaves the replica in an unknown state: stop serving
            log.exception("engine step failed")
            self.error = reason = f"the engine failed: {type(e).__name__}: {e}"
        with self._lock:
            self._stopping = True
        self._fail_all(EngineUnavailable(reason))

    def _take_submissions(self, block: bool) -> bool:
        """False when a blocking wait lasted idle_signal_s without anything arriving."""
        try:
            item = self._inbox.get(block=block, timeout=self.idle_signal_s if block else None)
        except queue.Empty:
            return not block
        try:
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled(self) -> None:
        """A cancelled sequence leaves at once; a step in flight that still has its row is landed without it."""
        self._waiting = deque(s for s in self._waiting if not s.future.cancelled())
        for slot in [slot for slot, s in self._active.items() if s.future.cancelled()]:
            del self._active[slot]

    def _launch_idle_lanes(self) -> None:
        busy = {f.lane for f in self._flights}
        for lane in range(len(self.generator.lanes)):
            if lane not in busy and (step := self._next_step(lane)) is not None:
                plan, sequences = step
                started = time.monotonic()
                if not self._flights:
                    self.step_started = started
                self._commands.send_step(plan)
                self._flights.append(_InFlight(lane, self.generator.launch(plan), sequences, started))

    def _land_oldest(self) -> None:
        done = self._flights.popleft()
        out = self.generator.land(done.flight)
        self.step_started = self._flights[0].started if self._flights else None
        for row, seq in enumerate(done.sequences):
            if self._active.get(seq.slot) is not seq:  # cancelled while its step was in flight
                continue
            self._record(seq, row, done.flight.plan.kind, out)
            reason = self._finish_reason(seq)
            if reason:
                self._finish(seq, reason)

    def _next_step(self, lane: int) -> Optional[tuple[StepPlan, list[_Sequence]]]:
        """Admitting waiting sequences comes first, so a freed slot is refilled at once."""
        slots = self.generator.lanes[lane]
        free = [slot for slot in slots if slot not in self._active]
        if self._waiting and free:
            return self._prefill(free)
        running = [self._active[slot] for slot in slots if slot in self._active]
        return self._decode(running) if running else None

    def _prefill(self, free: list[int]) -> tuple[StepPlan, list[_Sequence]]:
        admitted, width = [], 0
        while self._waiting and len(admitted) < len(free):
            wider = max(width, len(self._waiting[0].request.prompt))
            if admitted and wider * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
            width = wider
        tokens = torch.zeros(len(admitted), width, dtype=torch.long)  # [n, L] right-padded
        for row, (seq, slot) in enumerate(zip(admitted, free)):
            seq.slot = slot
            self._active[slot] = seq
            tokens[row, :len(seq.request.prompt)] = torch.tensor(seq.request.prompt)
        lengths = torch.tensor([len(s.request.prompt) for s in admitted])
        return self._plan("prefill", admitted, tokens, lengths), admitted

    def _decode(self, running: list[_Sequence]) -> tuple[StepPlan, list[_Sequence]]:
        tokens = torch.tensor([[s.tokens[-1]] for s in running])  # [n, 1]
        lengths = torch.tensor([len(s.request.prompt) + len(s.tokens) - 1 for s in running])
        return self._plan("decode", running, tokens, lengths), running

    def _plan(self, kind: str, seqs: list[_Sequence], tokens: torch.Tensor, lengths: torch.Tensor) -> StepPlan:
        sampling = [s.request.sampling for s in seqs]
        seeds = [x.seed if kind == "prefill" and x.seed is not None else -1 for x in sampling]
        return StepPlan(
            kind=kind, slots=torch.tensor([s.slot for s in seqs]), tokens=tokens, lengths=lengths,
            temperature=torch.tensor([x.temperature for x in sampling], dtype=torch.float32),
            top_k=torch.tensor([min(x.top_k, self.vocab_size) for x in sampling]),
            top_p=torch.tensor([x.top_p for x in sampling], dtype=torch.float32),
            greedy=torch.tensor([x.greedy for x in sampling]),
            repetition_penalty=torch.tensor([x.repetition_penalty for x in sampling], dtype=torch.float32),
            ban_eos=torch.tensor([self.eos_id is not None and len(s.tokens) < x.min_tokens
                                  for s, x in zip(seqs, sampling)]),
            seed=torch.tensor(seeds), logprobs=any(s.request.logprobs for s in seqs),
            full_logprobs=any(s.request.full_logprobs for s in seqs))

    def _record(self, seq: _Sequence, row: int, kind: str, out: StepOutput) -> None:
        token, prompt_len = int(out.tokens[row]), len(seq.request.prompt)
        seq.tokens.append(token)
        if seq.request.logprobs:
            if kind == "prefill":
                seq.logprobs += out.prompt_logprobs[row, :prompt_len - 1].tolist()
            seq.logprobs.append(float(out.logprobs[row]))
        if seq.request.full_logprobs:
            # prefill: rows 0..len-1 predict prompt tokens 1.. and the first new token; decode: one row
            seq.rows.append(out.full_logprobs[row, :prompt_len if kind == "prefill" else 1].clone())
        if seq.on_token is not None:
            seq.on_token(token)

    def _finish_reason(self, seq: _Sequence) -> Optional[str]:
        if seq.request.stop.reached(seq.tokens, self.tokenizer):
            return "stop"
        return "length" if len(seq.tokens) >= seq.request.max_new_tokens else None

    def _finish(self, seq: _Sequence, reason: str) -> None:
        del self._active[seq.slot]
        rows = torch.cat(seq.rows) if seq.request.full_logprobs else None
        result = SequenceResult(list(seq.request.prompt), seq.tokens, reason,
                                seq.logprobs if seq.request.logprobs else None, rows)
        try:
            seq.future.set_result(result)
        except InvalidStateError:  # cancelled by its client meanwhile: nobody is waiting
            pass

    def _fail_all(self, error: Exception) -> None:
        self._take_submissions(block=False)
        for seq in [*self._waiting, *self._active.values()]:
            try:
                seq.future.set_exception(error)
            except InvalidStateError:
                pass
        self._waiting.clear()
        self._active.clear()
