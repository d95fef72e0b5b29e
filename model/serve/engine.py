"""Continuous batching on a replica's leader, and the loop its followers run.

The split is vLLM v1's: the scheduler (scheduler.py, no torch) picks each lane's next step, the model runner
(model/generate.py, the Generator) runs it, and output processing (output.py) turns its outputs into tokens,
finished sequences and results. The engine's step thread owns all three. Each lane with no step in flight gets
one; then the oldest step in flight lands. So with two pipeline stages, one runs a step of lane 0 while the
other runs lane 1's. Every step goes to the other ranks (protocol.py) before it runs, since every rank runs
every step. HTTP handlers only submit sequences and wait on their futures; they never touch the model. A
constrained sequence's grammar matcher (grammar.py) lives on the leader: each plan carries the step's
allowed-token mask, and each landed token advances the matcher.

The step thread starts by warming up: an eager step on every rank, then the GPU's decode graphs, captured by
the thread that replays them (model/cuda_graphs.py). The engine is ready only then.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from collections.abc import Callable
from typing import Optional

import torch

from fleetgen.model.constraints import Constraint
from fleetgen.model.serve import protocol
from fleetgen.model.checkpoint.source import Tokenizer
from fleetgen.model.config import ModelConfig
from fleetgen.model.generate import Flight, Generator, StepPlan, greedy_plan
from fleetgen.model.parallel import ParallelState, describe_replica_devices
from fleetgen.model.serve.grammar import Grammars
from fleetgen.model.serve.kv_blocks import BlockManager
from fleetgen.model.serve.output import OutputProcessor, SequenceResult  # noqa: F401 (SequenceResult: API)
from fleetgen.model.serve.scheduler import ScheduledStep, Scheduler, SequenceState

log = logging.getLogger(__name__)

MAX_PREFILL_TOKENS = 8192  # rows × width of one prefill step: bounds its activations and logits


@dataclass(frozen=True)
class Sampling:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 0 or 1 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0   # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated so far
    logit_bias: tuple = ()          # OpenAI's: ((token id, bias added to its logit), ...)
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
    constraint: Optional[Constraint] = None  # the output must match it (model/constraints.py); ends when it does


class EngineUnavailable(RuntimeError):
    """The engine is not running (stopped, or failed): a request cannot be served."""


@dataclass
class _InFlight:
    step: ScheduledStep
    flight: Flight
    started: float             # time.monotonic() at launch


class Engine:
    def __init__(self, generator: Generator, tokenizer: Tokenizer, ps: ParallelState, config: ModelConfig,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS, idle_signal_s: Optional[float] = None,
                 run_ahead: Optional[bool] = None, prefix_caching: bool = True):
        """run_ahead: launch each decode step before the last one lands, fed its tokens on the device
        (Scheduler.decode_after); None: where the runner can (a lone rank) and it pays, on a GPU. A CPU runs a
        step while launching it, so there the host has nothing to overlap. prefix_caching: a prompt's leading
        full blocks already in the KV cache are reused, not computed again (kv_blocks.py)."""
        self.generator, self.tokenizer, self.ps, self.config = generator, tokenizer, ps, config
        if run_ahead is None:
            run_ahead = generator.can_feed and ps.device.type == "cuda"
        self.run_ahead = run_ahead
        self.eos_id: Optional[int] = config.eos_id
        self.vocab_size: int = config.vocab_size
        self.max_seq_len: int = generator.max_seq_len
        self.error: Optional[str] = None            # why the step loop died, if it did
        self.step_started: Optional[float] = None   # monotonic launch time of the oldest step in flight (watchdog)
        self.idle_signal_s = idle_signal_s          # an idle leader tells its followers this often (protocol)
        self.ready = threading.Event()              # warmed up: every rank can serve
        self.devices: list[str] = []                # each rank's device, in replica rank order (warm_up)
        self.startup_s: dict[str, float] = {}       # seconds each start-up phase took (the worker adds its own)
        cache = generator.cache
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, prefix_caching)
        self.scheduler = Scheduler(generator.lanes, max_prefill_tokens, self.blocks)
        self.outputs = OutputProcessor(tokenizer)
        self.grammars = Grammars(tokenizer, config.vocab_size, config.eos_id)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._flights: deque[_InFlight] = deque()   # launched, not landed: oldest first, at most one a lane
        # a decode step's tables travel in the envelope up to this many blocks a row (256 tokens of 16)
        self._commands = protocol.Commands(ps, generator.max_batch, min(16, cache.table.shape[1] - 1))
        self._lock = threading.Lock()               # orders submissions against stop()
        self._stopping = False
        self._warmed = False
        self._thread: Optional[threading.Thread] = None

    def warm_up(self) -> None:
        """Collective, once: one tiny eager prefill and decode on every rank, so a broken replica fails before
        serving; then, on a GPU, the decode graphs, on the calling thread (the leader's step thread, a
        follower's main thread)."""
        if self._warmed:
            return
        started = time.monotonic()
        self.devices = describe_replica_devices(self.ps)
        token = self.eos_id or 0
        slots, lengths, blocks = torch.tensor([0]), torch.tensor([2]), torch.tensor([[0]])  # 3 positions: a block
        prefill = greedy_plan("prefill", slots, torch.tensor([[token, token]]), lengths)
        prefill.blocks = blocks
        first = self.generator.step(prefill)
        decode = greedy_plan("decode", slots, first.tokens[:, None], lengths)
        decode.blocks = blocks
        self.generator.step(decode)
        captured = time.monotonic()
        graphs = self.generator.capture_graphs()
        self.startup_s.update(warm_up=captured - started, capture=time.monotonic() - captured)
        if graphs:
            log.info("captured %d decode graphs in %.1f s", graphs, self.startup_s["capture"])
        self._warmed = True

    def start(self) -> None:
        """Leader: start the step thread, which warms up (ready is set then) and serves."""
        if self._warmed:  # warmed up by the caller already
            self.ready.set()
        self._thread = threading.Thread(target=self._run, name="fleetgen-engine", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Leader: block until warmed up or failed; whether it is ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.error or not self.running or (deadline is not None and time.monotonic() > deadline):
                return self.ready.is_set()
        return True

    def follow(self) -> None:
        """Follower ranks: warm up, then run the leader's steps until it sends shutdown, a step of every lane in
        flight."""
        self.warm_up()
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
        sequence's slot at the next step. A constrained sequence gets its grammar matcher here (ConstraintError
        when its grammar does not fit the vocabulary; the first one also builds llguidance's vocabulary)."""
        total = len(request.prompt) + request.max_new_tokens
        limit = min(self.max_seq_len, self.blocks.block_size * len(self.blocks.blocks))
        if not request.prompt or total > limit:
            raise ValueError(f"a sequence needs 1 to {limit} tokens in all, got a prompt of "
                             f"{len(request.prompt)} + {request.max_new_tokens} new tokens")
        grammar = None if request.constraint is None else self.grammars.matcher(request.constraint)
        with self._lock:
            if self._stopping or self.error:
                raise EngineUnavailable(self.error or "the engine has stopped")
            future: Future = Future()
            self._inbox.put(SequenceState(request, future, on_token, grammar=grammar))
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

    def cache_report(self) -> dict[str, int]:
        """The KV cache's blocks, and the prompt tokens computed and reused over the engine's life (read from
        another thread: plain counters)."""
        blocks = self.blocks
        return {"blocks": len(blocks.blocks), "free_blocks": blocks.free_blocks,
                "prompt_tokens_computed": blocks.computed_tokens, "prompt_tokens_reused": blocks.hit_tokens,
                "preemptions": self.scheduler.preemptions}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if self.ps.device.type == "cuda":
            torch.cuda.set_device(self.ps.device)  # the current device is per thread; NCCL needs this rank's
        try:
            self.warm_up()
            self.ready.set()
            while not self._stopping:
                busy = self.scheduler.busy or self._flights
                if not self._take_submissions(block=not busy):
                    self._commands.send_idle()
                    continue
                self.scheduler.drop_cancelled()
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
                    self.scheduler.add(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _launch_idle_lanes(self) -> None:
        """Each lane without a step in flight gets one; a lone rank's lane with one step in flight also gets
        the decode step after it, fed on the device (Scheduler.decode_after)."""
        for lane in range(len(self.generator.lanes)):
            flights = [f for f in self._flights if f.step.lane == lane]
            if not flights and (step := self.scheduler.next_step(lane)) is not None:
                flights.append(self._launch(step))
            if len(flights) == 1 and self.run_ahead and \
                    (step := self.scheduler.decode_after(flights[0].step)) is not None:
                self._launch(step, feed=flights[0])

    def _launch(self, step: ScheduledStep, feed: Optional[_InFlight] = None) -> _InFlight:
        plan = self._plan(step)
        started = time.monotonic()
        if not self._flights:
            self.step_started = started
        self._commands.send_step(plan)
        flight = _InFlight(step, self.generator.launch(plan, feed=feed.flight if feed else None), started)
        self._flights.append(flight)
        return flight

    def _land_oldest(self) -> None:
        done = self._flights.popleft()
        out = self.generator.land(done.flight)
        self.step_started = self._flights[0].started if self._flights else None
        for row, sequence in enumerate(done.step.sequences):
            if not self.scheduler.is_current(done.step, row):  # cancelled or preempted while in flight
                continue
            self.outputs.record(done.step, row, sequence, out)
            complete = sequence.grammar is not None and Grammars.accept(sequence.grammar, sequence.tokens[-1])
            reason = "stop" if complete else self.outputs.finish_reason(sequence)
            if reason:
                self.scheduler.finish(sequence)
                self.outputs.finish(sequence, reason)

    def _plan(self, step: ScheduledStep) -> StepPlan:
        """The runner's plan for a scheduled step: its tokens right-padded, each row's sampling settings. Built
        with a few tensors from plain lists: this runs on the host before every step."""
        sequences, vocab, eos = step.sequences, self.vocab_size, self.eos_id
        width = max(len(t) for t in step.tokens)
        tokens = step.tokens if width == 1 else [t + [0] * (width - len(t)) for t in step.tokens]
        sampling = [s.request.sampling for s in sequences]
        ints = torch.tensor([
            step.slots, step.lengths, [min(x.top_k, vocab) for x in sampling],
            # a preempted sequence's generator is not seeded again: its stream would start over
            [x.seed if step.kind == "prefill" and x.seed is not None and not s.tokens else -1
             for s, x in zip(sequences, sampling)],
            [x.greedy for x in sampling],
            # a constrained row's grammar alone says when the end-of-document token may come
            [eos is not None and s.grammar is None and len(s.tokens) + step.ahead < x.min_tokens
             for s, x in zip(sequences, sampling)]])
        floats = torch.tensor([[x.temperature for x in sampling], [x.top_p for x in sampling],
                               [x.repetition_penalty for x in sampling]], dtype=torch.float32)
        slots, lengths, top_k, seed, greedy, ban_eos = ints
        return StepPlan(kind=step.kind, slots=slots, tokens=torch.tensor(tokens), lengths=lengths,
                        temperature=floats[0], top_k=top_k, top_p=floats[1], greedy=greedy.bool(),
                        repetition_penalty=floats[2], ban_eos=ban_eos.bool(), seed=seed,
                        logprobs=any(s.request.logprobs for s in sequences),
                        full_logprobs=any(s.request.full_logprobs for s in sequences),
                        token_mask=self.grammars.bitmask([s.grammar for s in sequences]),
                        **self._paging(step), **_logits_processing(sampling))

    def _paging(self, step: ScheduledStep) -> dict[str, torch.Tensor]:
        """Each row's block table; a prefill's cached prompt tokens and generated ones (a preempted sequence's)."""
        tables = [self.blocks.tables[s].blocks for s in step.sequences]
        width = max(len(t) for t in tables)
        columns = {"blocks": torch.tensor([t + [-1] * (width - len(t)) for t in tables])}
        if step.kind == "prefill":
            columns["starts"] = torch.tensor([s.cached for s in step.sequences])
            columns["resumed"] = torch.tensor([len(s.tokens) for s in step.sequences])
        return columns

    def _fail_all(self, error: Exception) -> None:
        self._take_submissions(block=False)
        for sequence in self.scheduler.every_sequence():
            self.outputs.fail(sequence, error)
        self.scheduler.clear()


def _logits_processing(sampling: list[Sampling]) -> dict[str, torch.Tensor]:
    """The plan's optional penalty and logit_bias columns, only when some row of the step has them."""
    columns = {}
    if any(x.presence_penalty or x.frequency_penalty for x in sampling):
        columns["presence_penalty"] = torch.tensor([x.presence_penalty for x in sampling], dtype=torch.float32)
        columns["frequency_penalty"] = torch.tensor([x.frequency_penalty for x in sampling], dtype=torch.float32)
    width = max(len(x.logit_bias) for x in sampling)
    if width:
        pairs = [list(x.logit_bias) + [(-1, 0.0)] * (width - len(x.logit_bias)) for x in sampling]
        columns["bias_ids"] = torch.tensor([[i for i, _ in row] for row in pairs])
        columns["bias_values"] = torch.tensor([[v for _, v in row] for row in pairs], dtype=torch.float32)
    return columns
