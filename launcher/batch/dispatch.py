"""Requests to the servers (replicas): each goes to the live replica that holds its prompt's prefix in its KV cache
when that one has a free slot (launcher/batch/affinity.py), else to the one with the least outstanding work.

One event loop drives every request (a callback each: no thread, no task): a heap of the replicas with a free slot
picks the least loaded in O(log replicas), each replica gets at most batch.concurrency kept-alive connections
(launcher/batch/http.py: asyncio and h11, a few kB a connection), and the ledger's lines are written once per
loop tick. A replica that fails (connection refused or lost, a timeout, 503 or another 5xx) is taken out at
once; its requests in flight are given back and done by the others, and it is probed on GET /health with
back-off and taken back when healthy. A client error (4xx) belongs to the record, never to the replica: a
shared request is split so each record gets its own verdict, and a record refused on its own goes to the
errors file.
"""
from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import h11

from fleetgen.conf.schema import Batch
from fleetgen.launcher.batch.affinity import Parked, PrefixTable, prefix_keys
from fleetgen.launcher.batch.formats import Item
from fleetgen.launcher.batch.http import Pool
from fleetgen.launcher.batch.ledger import Ledger
from fleetgen.launcher.batch.source import WorkSource
from fleetgen.launcher.errors import LaunchError

PROBE_TIMEOUT_S = 5
MAX_PROBE_BACKOFF_S = 60
FIRST_ERRORS_SHOWN = 5
GC_THRESHOLDS = (100_000, 50, 1000)  # fewer_collections(): allocations between young passes, young passes per old
TICK_S = 0.5  # how often the run checks drain and whether any server is left, and probes lost ones


@dataclass(eq=False)
class Replica:
    url: str
    state: str = "healthy"          # healthy | failed
    reason: Optional[str] = None    # why it was last taken out
    outstanding: int = 0            # items in flight
    requests: int = 0               # requests in flight
    done: int = 0
    completion_tokens: int = 0
    reused_tokens: int = 0          # prompt tokens it found in its KV cache
    failures: int = 0
    probe_at: float = 0.0
    in_flight: set = field(default_factory=set)
    version: int = 0                # FreeReplicas' entries of an older version are stale
    pool: Optional[Pool] = field(default=None, repr=False)  # its connections


class FreeReplicas:
    """The healthy replicas with a free request slot, least outstanding items first (ties: the one waiting
    longest). O(log replicas) a change: an entry is never searched for, it goes stale when its replica changes
    (update() is called after every change) and is dropped when it reaches the top, or when the heap grows past
    4 entries a replica + 64 (each replica has one live entry at most: O(1) a change, amortised)."""

    def __init__(self, concurrency: int, replicas: int):
        self._concurrency, self._most = concurrency, 4 * replicas + 64
        self._heap: list[tuple[int, int, int, Replica]] = []  # (outstanding, arrival, version, replica)
        self._arrival = itertools.count()

    def update(self, replica: Replica) -> None:
        replica.version += 1
        if replica.state == "healthy" and replica.requests < self._concurrency:
            heapq.heappush(self._heap, (replica.outstanding, next(self._arrival), replica.version, replica))
            if len(self._heap) > self._most:
                self._compact()

    def pop(self) -> Optional[Replica]:
        """The least loaded free replica, taken out until its next update(); None if none is free."""
        while self._heap:
            _, _, version, replica = heapq.heappop(self._heap)
            if version == replica.version:
                return replica
        return None

    def __len__(self) -> int:
        return len(self._heap)

    def _compact(self) -> None:
        """Drop the stale entries."""
        self._heap = [entry for entry in self._heap if entry[2] == entry[3].version]
        heapq.heapify(self._heap)


@dataclass(eq=False, slots=True)
class Group:
    items: list[Item]
    replica: Replica
    abandoned: bool = False  # its replica was lost: the items were given back already
    timeout: float = 0.0     # seconds it may take


@dataclass
class Answer:
    kind: str                       # ok | record (the record's fault) | replica (the server's) | fatal
    results: Any = None
    status: Optional[int] = None
    body: Any = None
    message: str = ""


class Dispatcher:
    def __init__(self, source: WorkSource, fmt, ledger: Ledger, servers: list[str], token: Optional[str],
                 settings: Batch, model: str, total: int):
        self._source, self._fmt, self._ledger, self._settings = source, fmt, ledger, settings
        self._model, self.total = model, total
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.replicas = [Replica(url.rstrip("/")) for url in servers]
        for replica in self.replicas:
            try:
                replica.pool = Pool(replica.url, headers)
            except ValueError as e:
                raise LaunchError(f"batch: server {e} (the replicas serve plain HTTP)") from None
        self._free = FreeReplicas(settings.concurrency, len(self.replicas))
        self._prefixes, self._parked = PrefixTable(), Parked()
        self._admitting = True
        self._flush_scheduled = False
        self.stop_reason: Optional[str] = None
        self.in_flight = self.retried = self.done_now = self.prompt_tokens_now = self.completion_tokens_now = 0
        self.first_errors: list[str] = []
        self.first_request_at: Optional[float] = None
        self._all_lost_since: Optional[float] = None

    # ---- the run

    def run(self, drain: Optional[threading.Event]) -> None:
        """Until every item is finished, the run is stopped (drain, abort, no server left) or fails."""
        with fewer_collections():
            asyncio.run(self._run(drain))

    async def _run(self, drain: Optional[threading.Event]) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        for replica in self.replicas:
            self._free.update(replica)
        prober = self._loop.create_task(self._probe())
        try:
            self._admit()
            while not self._finished() and self.stop_reason is None:
                if drain is not None and drain.is_set():
                    self._stop("drained")
                self._check_servers_left()
                await self._sleep(TICK_S)
            deadline = time.monotonic() + self._settings.drain_timeout_s
            while self.in_flight and time.monotonic() < deadline:
                await self._sleep(min(TICK_S, deadline - time.monotonic()))
        finally:
            self._admitting = False
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
            for replica in self.replicas:  # the answers still in flight are never settled
                replica.pool.close()
            self._ledger.flush()

    async def _sleep(self, seconds: float) -> None:
        """Until `seconds` pass (none when not above 0) or a request settles with nothing in flight or a stop
        reason."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def _finished(self) -> bool:
        return self.in_flight == 0 and not self._parked and self._source.exhausted

    def _check_servers_left(self) -> None:
        if any(r.state == "healthy" for r in self.replicas):
            self._all_lost_since = None
            return
        now = time.monotonic()
        self._all_lost_since = self._all_lost_since or now
        if now - self._all_lost_since > self._settings.replica_wait_s:
            reasons = "; ".join(f"{r.url}: {r.reason}" for r in self.replicas)
            self._stop(f"every server was lost for more than {self._settings.replica_wait_s:.0f} s "
                       f"(batch.replica_wait_s): {reasons}")

    # ---- requests

    def _admit(self) -> None:
        """Fill every free slot, least loaded replica first, while there is work to take."""
        while self._admitting and self.stop_reason is None:
            replica = self._free.pop()
            if replica is None:
                break
            work = self._work_for(replica)
            if work is None:
                self._free.update(replica)
                break
            self._start(*work, replica)

    def _work_for(self, replica: Replica) -> Optional[tuple[list[Item], list[int]]]:
        """A request's items and prefix keys for replica: a group parked for it; else fresh work, on the way
        starting each group whose prefix another free replica holds there and parking each whose holder is
        busy; else, once the park is full or the work is all taken, the group parked longest."""
        parked = self._parked.take_for(replica)
        if parked is not None:
            return parked
        while not self._parked.full:
            items = self._source.take()
            if not items:
                break
            keys = prefix_keys(self._fmt.prefix_text(items[0]))
            owner = self._prefixes.owner(keys) if keys else None
            if owner is None or owner is replica:
                return items, keys
            if owner.requests < self._settings.concurrency:  # owner() gives healthy replicas only
                self._start(items, keys, owner)
            else:
                self._parked.park(items, keys, owner)
        return self._parked.take_oldest()

    def _start(self, items: list[Item], keys: list[int], replica: Replica) -> None:
        self._prefixes.claim(keys, replica)
        group = Group(items, replica)
        replica.outstanding += len(items)
        replica.requests += 1
        replica.in_flight.add(group)
        self.in_flight += len(items)
        self._free.update(replica)
        self._send(group)

    def _answered(self, group: Group, answer: Answer) -> None:
        self._settle(group, answer)
        self._admit()
        if not self._flush_scheduled:  # the lines of every answer settled in this loop tick, in one write
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self.in_flight == 0 or self.stop_reason is not None:
            self._wake.set()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._ledger.flush()

    def _send(self, group: Group) -> None:
        """Send the group's request; its answer comes to _answered, from the event loop. No task: a request in
        flight is its connection, its timer and this callback (launcher/batch/http.py)."""
        fmt, items = self._fmt, group.items
        refusal = next((item.record.refusal for item in items if item.record.refusal), None)
        if refusal is not None:  # batch.long_prompts=skip: the answer a server would give, without asking one
            self._loop.call_soon(self._answered, group, Answer(
                "record", status=400, message=refusal,
                body={"error": {"message": refusal, "type": "invalid_request_error", "param": None, "code": 400}}))
            return
        group.timeout = self._timeout_s(items)
        if self.first_request_at is None:
            self.first_request_at = time.monotonic()
        group.replica.pool.request(fmt.method, fmt.route(items), json.dumps(fmt.body(items, self._model)).encode(),
                                   group.timeout, self._reply, group)

    def _reply(self, group: Group, outcome: Any) -> None:
        """The server's (status, body), or the exception that ended the request."""
        if isinstance(outcome, (asyncio.TimeoutError, TimeoutError)):  # TimeoutError is an OSError
            answer = Answer("replica", message=f"no answer within {group.timeout:.3g} s (batch.request_timeout_s + "
                                               "batch.timeout_per_token_s × tokens asked)")
        elif isinstance(outcome, BaseException):  # OSError, h11.ProtocolError
            answer = Answer("replica", message=f"{type(outcome).__name__}: {outcome}")
        else:
            status, data = outcome
            answer = self._judge(group.items, status, _json_or_text(data))
        self._answered(group, answer)

    def _timeout_s(self, items: list[Item]) -> float:
        return self._settings.request_timeout_s + self._settings.timeout_per_token_s * self._fmt.tokens_requested(items)

    def _judge(self, items: list[Item], status: int, body: Any) -> Answer:
        if status == 200:
            try:
                return Answer("ok", results=self._fmt.results(items, body))
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                return Answer("replica", message=f"malformed answer ({type(e).__name__}: {e})")
        message = f"HTTP {status}: {_error_text(body)}"
        if status in (401, 403):
            return Answer("fatal", status=status, message=f"{message} (the server refused the launcher's token)")
        if status // 100 == 4 and status not in (408, 429):
            return Answer("record", status=status, body=body, message=message)
        return Answer("replica", status=status, message=message)

    def _settle(self, group: Group, answer: Answer) -> None:
        replica, items = group.replica, group.items
        replica.outstanding -= len(items)
        replica.requests -= 1
        replica.in_flight.discard(group)
        if not group.abandoned:
            self.in_flight -= len(items)
        if answer.kind == "ok":
            self._record(replica, items, answer.results)
        elif answer.kind == "record" and not group.abandoned:
            if len(items) > 1:
                self._source.give_back(items, first=True)  # which record was it? ask for each alone
            else:
                [item] = items
                self._fail(item, answer.message, answer.status, answer.body)
        elif answer.kind == "replica" and not group.abandoned:
            self._lose(replica, answer.message)
            self._retry(items, answer.message)
        elif answer.kind == "fatal":
            self._stop(answer.message)
        self._free.update(replica)

    def _record(self, replica: Replica, items: list[Item], results: list) -> None:
        for item, (record, tokens) in zip(items, results):
            index, sample = item.position
            if self._ledger.add(index, sample, item.record.key, True, record, tokens):
                replica.done += 1
                replica.completion_tokens += tokens.completion
                replica.reused_tokens += tokens.reused
                self.done_now += 1
                self.prompt_tokens_now += tokens.prompt
                self.completion_tokens_now += tokens.completion

    def _fail(self, item: Item, message: str, status: Optional[int], body: Any) -> None:
        index, sample = item.position
        if not self._ledger.add(index, sample, item.record.key, False, self._fmt.error(item, message, status, body)):
            return
        self.done_now += 1
        if len(self.first_errors) < FIRST_ERRORS_SHOWN:
            self.first_errors.append(f"key {item.record.key!r} (line {item.record.line}, sample {sample}): {message}")
        if self._ledger.failed > self._settings.max_error_fraction * self.total:
            self._stop(f"aborted: {self._ledger.failed} of {self.total} items failed, more than "
                       f"batch.max_error_fraction={self._settings.max_error_fraction}")

    def _stop(self, reason: str) -> None:
        """The first reason stands: answers still settling after it do not rewrite it."""
        self.stop_reason = self.stop_reason or reason

    def _lose(self, replica: Replica, reason: str) -> None:
        """Take a replica out; its other requests in flight are given back now rather than awaited."""
        if replica.state == "failed":
            return
        replica.state, replica.reason = "failed", reason
        replica.failures += 1
        replica.pool.close_idle()  # a server that comes back has them reset; those in flight answer still
        self._free.update(replica)
        replica.probe_at = time.monotonic() + min(2 ** (replica.failures - 1), MAX_PROBE_BACKOFF_S)
        for group in list(replica.in_flight):
            group.abandoned = True
            self.in_flight -= len(group.items)
            self._retry(group.items, reason)
        for items in self._parked.take_all_for(replica):  # not tried yet: no attempt counted
            self._source.give_back(items)

    def _retry(self, items: list[Item], reason: str) -> None:
        for item in items:
            item.attempts += 1
            self.retried += 1
            if item.attempts > self._settings.max_retries:
                self._fail(item, f"gave up after {item.attempts} attempts (batch.max_retries="
                                 f"{self._settings.max_retries}); last: {reason}", None, None)
            else:
                self._source.give_back([item])

    # ---- taking lost replicas back

    async def _probe(self) -> None:
        while True:
            now = time.monotonic()
            due = [r for r in self.replicas if r.state == "failed" and r.probe_at <= now]
            answers = await asyncio.gather(*(_healthy(r.pool) for r in due))
            for replica, healthy in zip(due, answers):
                if healthy:
                    replica.state = "healthy"
                    self._free.update(replica)
                else:
                    replica.probe_at = time.monotonic() + min(2 ** replica.failures, MAX_PROBE_BACKOFF_S)
                    replica.failures += 1
            if any(answers):
                self._admit()
            await asyncio.sleep(TICK_S)


@contextmanager
def fewer_collections():
    """The cyclic garbage collector's passes made rarer while the driver runs. It holds a connection and a
    request per slot in flight (8,192 at 1,024 replicas × batch.concurrency 8), all long-lived, and with
    Python's default thresholds (700, 10, 10) every 70,000th allocation traverses them all: that was half the
    driver's CPU per item at 1,024 replicas (0.135 ms, 0.077 ms with these; benchmarks/dispatch_scale.py).
    What exists before the run is frozen out of the passes."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


async def _healthy(pool: Pool) -> bool:
    try:
        status, _ = await pool.fetch("GET", "/health", None, PROBE_TIMEOUT_S)
    except (asyncio.TimeoutError, OSError, h11.ProtocolError):  # TimeoutError is an OSError
        return False
    return status == 200


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # UnicodeDecodeError included
        return data[:500].decode(errors="replace")


def _error_text(body: Any) -> str:
    """NeMo's {"error": "..."} or OpenAI's {"error": {"message": ...}}."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error if error is not None else body)[:500]
