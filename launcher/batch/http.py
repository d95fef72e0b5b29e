"""The dispatcher's HTTP/1.1 client: a pool of kept-alive connections per server, each an asyncio Protocol
around h11's state machine, answering through a callback.

It exists for memory. A request in flight here is a connection (transport, protocol, h11's state), one timer
and the callback: no task, no coroutine, no future. aiohttp keeps a task and its coroutines, a stream reader, a
response, a request, a cookie jar's morsels and a timer context for each, and imports 20 MB of modules: at
1,024 replicas × batch.concurrency 8 that was 250 MB of driver RSS (README, "At scale"). It does only what the
dispatcher needs: one request at a time per connection, the body read whole, one timeout over the exchange
(connecting included), a server's address resolved once; a connection that failed, timed out or is not
reusable (Connection: close, HTTP/1.0) is closed, never pooled.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Optional
from collections.abc import Callable
from urllib.parse import urlsplit

import h11


DIALS = 2  # connects in progress at once, a server
Reply = Callable[[Any, Any], None]  # reply(key, outcome): (status, body bytes), or the exception that ended it


class Pool:
    """Connections to one server (a base URL: http://host:port), opened on demand, one request at a time each,
    DIALS connecting at once (the others' requests wait for theirs): a run's first requests, 8,192 at 1,024
    replicas × batch.concurrency 8, each connecting at once held a task, coroutines and futures each, a peak of
    memory the allocator keeps for the whole run (about 20 MB of RSS)."""

    def __init__(self, url: str, headers: dict[str, str]):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: not a plain http://host:port URL")
        self._host, self._port, self._prefix = parts.hostname, parts.port or 80, parts.path.rstrip("/")
        self._headers = [("Host", parts.netloc), *headers.items()]
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()
        self._undialed: deque[Connection] = deque()
        self._dialing = 0

    def request(self, method: str, target: str, body: Optional[bytes], timeout: float, reply: Reply,
                key: Any = None) -> None:
        """Send a request (body: JSON, or None for none) on an idle connection or a new one; reply(key,
        (status, body)) when it is answered, or reply(key, exception) when it fails: OSError (refused, reset,
        closed, not HTTP/1.1), h11.ProtocolError, or TimeoutError past `timeout` seconds (connecting included).
        reply is called later, from the event loop, never before request() returns."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        headers = self._headers if body is None else \
            [*self._headers, ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        head = h11.Request(method=method, target=self._prefix + target, headers=headers)
        while self._idle:
            connection = self._idle.pop()
            if connection.open:
                connection.exchange(head, body, deadline, reply, key)
                return
        connection = Connection(self)
        self._open.add(connection)
        connection.exchange(head, body, deadline, reply, key)  # sent once connected
        self._undialed.append(connection)
        self._dial()

    def _dial(self) -> None:
        while self._dialing < DIALS and self._undialed:
            connection = self._undialed.popleft()
            if not connection.closed:  # else it timed out waiting
                self._dialing += 1
                connection.dial(self._host, self._port)

    def dialed(self, host: Optional[str]) -> None:
        """A connect ended; host: the address it reached, where later ones go without resolving the name."""
        self._dialing -= 1
        self._host = host or self._host
        self._dial()

    async def fetch(self, method: str, target: str, body: Optional[bytes], timeout: float) -> tuple[int, bytes]:
        """request() awaited: (status, body), or its exception raised."""
        answer = asyncio.get_running_loop().create_future()

        def reply(_, outcome) -> None:
            if not answer.done():
                answer.set_exception(outcome) if isinstance(outcome, BaseException) else answer.set_result(outcome)

        self.request(method, target, body, timeout, reply)
        return await answer

    def close_idle(self) -> None:
        """Close the idle connections (a lost server's: one that comes back has them reset)."""
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def close(self) -> None:
        """Close every connection; requests in flight are never answered."""
        self._undialed.clear()
        for connection in list(self._open):
            connection.close()
        self._idle.clear()


class Connection(asyncio.Protocol):
    """One kept-alive connection. Its answer goes to the request's reply, from data_received (the whole
    answer in), connection_lost, a failed connect, or the timer at the deadline; the connection is back in its
    pool's idle ones before that when it can take another request. Connecting is a bare task of the loop's
    create_connection, timed by the request's own timer (no wait_for: fewer objects at the start's peak)."""
    __slots__ = ("_pool", "_h11", "_transport", "closed", "_dialing", "_unsent", "_reply", "_key", "_timer",
                 "_status", "_body")

    def __init__(self, pool: Pool):
        self._pool = pool
        self._h11 = h11.Connection(h11.CLIENT)
        self._transport: Optional[asyncio.Transport] = None
        self.closed = False
        self._dialing: Optional[asyncio.Task] = None
        self._unsent: Optional[bytes] = None  # the request, until connected
        self._reply: Optional[Reply] = None
        self._key: Any = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._status = 0
        self._body: list[bytes] = []

    def dial(self, host: str, port: int) -> None:
        self._dialing = asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().create_connection(lambda: self, host, port))
        self._dialing.add_done_callback(self._dialed)

    def _dialed(self, task: asyncio.Task) -> None:
        self._dialing = None
        failed = task.cancelled() or task.exception() is not None
        self._pool.dialed(None if failed else task.result()[0].get_extra_info("peername")[0])
        if task.cancelled():
            return
        if task.exception() is not None:
            self._settle(task.exception())
            return
        transport, _ = task.result()
        unsent, self._unsent = self._unsent, None
        if unsent is not None and self.open:
            transport.write(unsent)

    def connection_made(self, transport) -> None:
        self._transport = transport

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def exchange(self, head: h11.Request, body: Optional[bytes], deadline: float, reply: Reply, key: Any) -> None:
        loop = asyncio.get_running_loop()
        self._reply, self._key, self._status, self._body = reply, key, 0, []
        self._timer = loop.call_at(deadline, self._time_out)
        message = self._h11.send(head)
        if body:
            message += self._h11.send(h11.Data(data=body))
        message += self._h11.send(h11.EndOfMessage())
        if self.open:
            self._transport.write(message)
        elif self._transport is None and not self.closed:  # connecting
            self._unsent = message
        else:  # lost while it was idle
            loop.call_soon(self._settle, ConnectionResetError("the connection was closed"))

    def data_received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._read()

    def eof_received(self) -> None:
        self._h11.receive_data(b"")
        self._read()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._transport = None
        self._pool._open.discard(self)
        self._settle(exc or ConnectionResetError("the server closed the connection"))

    def _time_out(self) -> None:
        self._settle(TimeoutError("no answer in time"))

    def _read(self) -> None:
        while self._reply is not None:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                self._settle(ConnectionError(f"not an HTTP/1.1 answer: {e}"))
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                self._body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._settle((self._status, b"".join(self._body)))
            elif isinstance(event, h11.ConnectionClosed):
                self._settle(ConnectionResetError("the server closed the connection"))

    def _settle(self, outcome) -> None:
        """Hand the answer (or the failure) over, once; a failed connection is closed, a done one pooled."""
        reply, key, self._reply, self._key = self._reply, self._key, None, None
        if reply is None:
            return
        self._timer.cancel()
        self._timer, self._body = None, []
        if not isinstance(outcome, BaseException) and self._reusable():
            self._pool._idle.append(self)
        else:
            self.close()
        reply(key, outcome)

    def _reusable(self) -> bool:
        """Both sides done and kept alive: ready for the next request."""
        if self.open and self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        """Close it; a request in flight on it is never answered."""
        self._reply = self._key = self._unsent = None
        self.closed = True
        if self._dialing is not None:
            self._dialing.cancel()
            self._dialing = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._pool._open.discard(self)
