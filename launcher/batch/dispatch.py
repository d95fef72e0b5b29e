"""Requests to the servers (replicas): each goes to the live replica with the least outstanding work.

A replica that fails (connection refused or lost, a timeout, 503 or another 5xx) is taken out at once; its
requests in flight are given back and done by the others, and it is probed on GET /health with back-off and
taken back when healthy. A client error (4xx) belongs to the record, never to the replica: a shared request
is split so each record gets its own verdict, and a record refused on its own goes to the errors file.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx

from fleetgen.conf.schema import Batch
from fleetgen.launcher.batch.formats import Item
from fleetgen.launcher.batch.ledger import Ledger
from fleetgen.launcher.batch.source import WorkSource

PROBE_TIMEOUT_S = 5
MAX_PROBE_BACKOFF_S = 60
FIRST_ERRORS_SHOWN = 5


@dataclass(eq=False)
class Replica:
    url: str
    state: str = "healthy"          # healthy | failed
    reason: Optional[str] = None    # why it was last taken out
    outstanding: int = 0            # items in flight
    requests: int = 0               # requests in flight
    done: int = 0
    completion_tokens: int = 0
    failures: int = 0
    probe_at: float = 0.0
    in_flight: set = field(default_factory=set)


@dataclass(eq=False)
class Group:
    items: list[Item]
    replica: Replica
    abandoned: bool = False  # its replica was lost: the items were given back already


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
        self.replicas = [Replica(url.rstrip("/")) for url in servers]
        self._workers = settings.concurrency * len(servers)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(headers=headers, limits=httpx.Limits(max_connections=self._workers + 4,
                                                                          max_keepalive_connections=self._workers))
        self._cv = threading.Condition()
        self._admitting, self._closing = True, False
        self.stop_reason: Optional[str] = None
        self.in_flight = self.retried = self.done_now = self.prompt_tokens_now = self.completion_tokens_now = 0
        self.first_errors: list[str] = []
        self.first_request_at: Optional[float] = None
        self._all_lost_since: Optional[float] = None

    # ---- the run

    def run(self, drain: Optional[threading.Event]) -> None:
        """Until every item is finished, the run is stopped (drain, abort, no server left) or fails."""
        threads = [threading.Thread(target=self._work, name=f"fleetgen-batch-{i}", daemon=True)
                   for i in range(self._workers)]
        threads.append(threading.Thread(target=self._probe, name="fleetgen-batch-probe", daemon=True))
        for thread in threads:
            thread.start()
        try:
            with self._cv:
                while not self._finished() and self.stop_reason is None:
                    if drain is not None and drain.is_set():
                        self._stop("drained")
                    self._check_servers_left()
                    self._cv.wait(0.5)
                self._admitting = False
                self._cv.notify_all()
                deadline = time.monotonic() + self._settings.drain_timeout_s
                while self.in_flight and time.monotonic() < deadline:
                    self._cv.wait(0.5)
        finally:
            with self._cv:
                self._admitting, self._closing = False, True
                self._cv.notify_all()
            self._client.close()

    def _finished(self) -> bool:
        return self.in_flight == 0 and self._source.exhausted

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

    # ---- workers

    def _work(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            self._settle(group, self._send(group))

    def _next_group(self) -> Optional[Group]:
        with self._cv:
            while self._admitting:
                replica = self._least_outstanding()
                items = self._source.take() if replica is not None else []
                if items:
                    group = Group(items, replica)
                    replica.outstanding += len(items)
                    replica.requests += 1
                    replica.in_flight.add(group)
                    self.in_flight += len(items)
                    return group
                if self._finished():
                    self._cv.notify_all()
                self._cv.wait(0.5)
            return None

    def _least_outstanding(self) -> Optional[Replica]:
        free = [r for r in self.replicas if r.state == "healthy" and r.requests < self._settings.concurrency]
        return min(free, key=lambda r: r.outstanding, default=None)

    def _send(self, group: Group) -> Answer:
        fmt, items = self._fmt, group.items
        timeout = self._settings.request_timeout_s + self._settings.timeout_per_token_s * fmt.tokens_requested(items)
        if self.first_request_at is None:
            self.first_request_at = time.monotonic()
        try:
            response = self._client.request(fmt.method, group.replica.url + fmt.route,
                                            json=fmt.body(items, self._model), timeout=timeout)
        except httpx.TimeoutException:
            return Answer("replica", message=f"no answer within {timeout:.3g} s (batch.request_timeout_s + "
                                             "batch.timeout_per_token_s × tokens asked)")
        except httpx.TransportError as e:
            return Answer("replica", message=f"{type(e).__name__}: {e}")
        return self._judge(items, response)

    def _judge(self, items: list[Item], response: httpx.Response) -> Answer:
        status, body = response.status_code, _json_or_text(response)
        if status == 200:
            try:
                return Answer("ok", results=self._fmt.results(items, body))
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                return Answer("replica", message=f"malformed answer ({type(e).__name__}: {e})")
        message = f"HTTP {status}: {_error_text(body)}"
        if status in (401, 403):
            return Answer("fatal", status=status, message=f"{message} (the server refused the launcher's token)")
        if 400 <= status < 500 and status not in (408, 429):
            return Answer("record", status=status, body=body, message=message)
        return Answer("replica", status=status, message=message)

    def _settle(self, group: Group, answer: Answer) -> None:
        with self._cv:
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
                    self._fail(items[0], answer.message, answer.status, answer.body)
            elif answer.kind == "replica" and not group.abandoned:
                self._lose(replica, answer.message)
                self._retry(items, answer.message)
            elif answer.kind == "fatal":
                self._stop(answer.message)
            self._cv.notify_all()

    def _record(self, replica: Replica, items: list[Item], results: list) -> None:
        for item, (record, prompt_tokens, completion_tokens) in zip(items, results, strict=True):
            index, sample = item.position
            if self._ledger.add(index, sample, item.record.key, True, record, (prompt_tokens, completion_tokens)):
                replica.done += 1
                replica.completion_tokens += completion_tokens
                self.done_now += 1
                self.prompt_tokens_now += prompt_tokens
                self.completion_tokens_now += completion_tokens

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
        replica.probe_at = time.monotonic() + min(2 ** (replica.failures - 1), MAX_PROBE_BACKOFF_S)
        for group in list(replica.in_flight):
            group.abandoned = True
            self.in_flight -= len(group.items)
            self._retry(group.items, reason)

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

    def _probe(self) -> None:
        with httpx.Client(headers=self._client.headers, timeout=PROBE_TIMEOUT_S) as client:
            while True:
                with self._cv:
                    if self._closing:
                        return
                    due = [r for r in self.replicas if r.state == "failed" and r.probe_at <= time.monotonic()]
                for replica in due:
                    healthy = _healthy(client, replica.url)
                    with self._cv:
                        if healthy:
                            replica.state = "healthy"
                        else:
                            replica.probe_at = time.monotonic() + min(2 ** replica.failures, MAX_PROBE_BACKOFF_S)
                            replica.failures += 1
                        self._cv.notify_all()
                time.sleep(0.5)


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def _error_text(body: Any) -> str:
    """NeMo's {"error": "..."} or OpenAI's {"error": {"message": ...}}."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error if error is not None else body)[:500]
