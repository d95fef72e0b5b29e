"""Liveness of a replica's ranks, watched on threads that never touch the model's collectives.

The leader listens on a TCP port of its own (shared with the replica by one all_gather at start-up); every
follower connects, says hello with the replica's secret, and both sides send a beat several times per
heartbeat timeout. The replica fails when a follower's connection closes without a goodbye (its process
died), a follower is silent for server.heartbeat_timeout_s (hung: SIGSTOP, a stuck GPU or NCCL), the leader's
engine runs one step for longer than server.step_timeout_s or fails, or any rank reports an error of its own.
An idle engine is never timed: only steps are.

A failed replica's ranks all exit non-zero, and at once: a rank blocked in a gloo or NCCL collective cannot
be woken in any other way, so the leader tells every follower, which exits from its liveness thread, and the
leader answers /health and every request with 503 and the reason for FAILED_LINGER_S before it exits too. A
follower that loses its leader (connection closed, or silent) exits the same way.
"""
from __future__ import annotations

import os
import secrets
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn, Optional
from collections.abc import Callable

import torch.distributed as dist

from fleetgen.model.parallel import ParallelState
from fleetgen.slurm.rank_exit import write_exit

BEATS_PER_TIMEOUT = 6   # beats sent per heartbeat timeout, each way
POLL_S = 0.5            # how often the liveness threads look at the clock
FAILED_LINGER_S = 5.0   # a failed leader keeps answering 503 with the reason this long, then exits
ATTRIBUTION_S = 1.0     # after a failed collective, how long the leader waits to learn which peer died
HELLO_TIMEOUT_S = 10.0  # an unauthenticated connection to the leader must say hello within this
MAX_HELLO_BYTES = 256  # a stranger's hello may be this long before its end of line; longer, it is dropped


@dataclass
class _Peer:
    rank: int
    node: str
    heard: float          # monotonic time of its last message (at first: when the leader started watching)
    sock: Optional[socket.socket] = None
    buffer: bytes = b""
    left: bool = False    # said goodbye: it ended normally


class Liveness:
    """One rank's side. The leader watches its followers and its engine; followers prove they are alive."""

    def __init__(self, ps: ParallelState, nodes: list[str], heartbeat_timeout_s: float, step_timeout_s: float,
                 job_folder, secret: str):
        self.ps, self.nodes, self.job_folder, self._secret = ps, nodes, job_folder, secret
        self.heartbeat_timeout_s, self.step_timeout_s = heartbeat_timeout_s, step_timeout_s
        self.interval_s = heartbeat_timeout_s / BEATS_PER_TIMEOUT
        self.on_failure: Optional[Callable[[str], None]] = None  # leader: the server's fail()
        self.engine = None  # leader: the Engine whose steps are timed, once it runs
        self._peers: dict[int, _Peer] = {}  # leader: its followers
        self._leader: Optional[socket.socket] = None  # follower: its connection to the leader
        self._closing = threading.Event()
        self._failing = threading.Lock()
        self._send_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def start(cls, ps: ParallelState, node: str, leader_host: str, heartbeat_timeout_s: float,
              step_timeout_s: float, job_folder) -> Liveness:
        """Collective over the replica: every rank learns the others' nodes and the leader's address."""
        leading = ps.world_rank == ps.first_rank
        listener = socket.create_server(("", 0)) if leading and len(ps.replica_ranks) > 1 else None
        mine = (node, leader_host, listener.getsockname()[1] if listener else 0, secrets.token_hex(16))
        gathered = [mine]
        if len(ps.replica_ranks) > 1:
            gathered = [None] * len(ps.replica_ranks)
            dist.all_gather_object(gathered, mine, group=ps.replica_group)
        _, host, port, secret = gathered[0]
        liveness = cls(ps, [g[0] for g in gathered], heartbeat_timeout_s, step_timeout_s, job_folder, secret)
        if leading:
            now = time.monotonic()
            liveness._peers = {r: _Peer(r, liveness.nodes[r - ps.first_rank], heard=now) for r in ps.replica_ranks[1:]}
            target, args = liveness._watch, (listener,)
        else:
            liveness._leader = socket.create_connection((host, port), timeout=heartbeat_timeout_s)
            target, args = liveness._beat, ()
        liveness._thread = threading.Thread(target=target, args=args, name="fleetgen-liveness", daemon=True)
        liveness._thread.start()
        return liveness

    def describe(self, rank: int) -> str:
        return f"rank {rank} on {self.nodes[rank - self.ps.first_rank]}"

    def fail(self, reason: str) -> NoReturn:
        """This replica has failed: tell the other ranks, let the leader answer 503 for a while, exit 1."""
        self._failing.acquire()  # held for good: a second failing thread waits here until the first ends the process
        # stderr is line-buffered (Python 3.9+): this line is out at once
        print(f"rank {self.ps.world_rank}: replica {self.ps.replica} failed: {reason}", file=sys.stderr)
        node = self.nodes[self.ps.world_rank - self.ps.first_rank]
        write_exit(self.job_folder, self.ps.world_rank, node, f"replica {self.ps.replica} failed: {reason}")
        for sock in [self._leader, *(p.sock for p in self._peers.values())]:
            self._send(sock, f"failed {reason}")
        if self.on_failure is not None:
            self.on_failure(reason)
            time.sleep(FAILED_LINGER_S)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    def fail_engine(self, error: str) -> NoReturn:
        """The leader's engine failed. A collective fails when a peer dies, and the peer's closed liveness
        connection says which one a moment later: give the watcher that moment to name it."""
        time.sleep(ATTRIBUTION_S)
        self.fail(f"{self.describe(self.ps.world_rank)}: {error}")

    def close(self) -> None:
        """The rank ends normally: say goodbye, so that its closed connection is not taken for a death."""
        self._closing.set()
        for sock in [self._leader, *(p.sock for p in self._peers.values())]:
            self._send(sock, "bye")
        if self._leader is not None:
            try:
                self._leader.shutdown(socket.SHUT_RDWR)  # wakes the beating thread
            except OSError:
                pass  # the leader closed it first
        if self._thread is not None:
            self._thread.join()

    # ---- the leader

    def _watch(self, listener: Optional[socket.socket]) -> None:
        strangers: dict[socket.socket, list] = {}  # connections that have not said hello: [buffer, deadline]
        next_beat = time.monotonic()
        while not self._closing.is_set():
            followers = {p.sock: p for p in self._peers.values() if p.sock is not None and not p.left}
            waiting = [s for s in (listener, *strangers, *followers) if s is not None]
            readable, _, _ = select.select(waiting, [], [], POLL_S)
            for sock in readable:
                if sock is listener:
                    self._accept(listener, strangers)
                elif sock in strangers:
                    self._greet(sock, strangers)
                else:
                    self._hear(followers[sock])
            for sock in [s for s, (_, deadline) in strangers.items() if deadline < time.monotonic()]:
                del strangers[sock]
                sock.close()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.interval_s
                for sock in followers:
                    self._send(sock, "beat")
            self._check()
        if listener is not None:
            listener.close()

    def _accept(self, listener: socket.socket, strangers: dict) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:  # the client gave up before we got to it
            return
        conn.settimeout(self.interval_s)
        strangers[conn] = [b"", time.monotonic() + HELLO_TIMEOUT_S]

    def _greet(self, sock: socket.socket, strangers: dict) -> None:
        """A connection becomes a follower's once it says `hello RANK SECRET`; anything else is dropped."""
        data = _receive(sock)
        if data is None or len(strangers[sock][0]) > MAX_HELLO_BYTES:
            del strangers[sock]
            sock.close()
            return
        strangers[sock][0] += data
        if b"\n" not in strangers[sock][0]:
            return
        line, rest = strangers.pop(sock)[0].split(b"\n", 1)
        words = line.decode(errors="replace").split()
        hello = len(words) == 3 and words[0] == "hello" and words[1].isdigit()
        peer = self._peers.get(int(words[1])) if hello else None
        if peer is None or not secrets.compare_digest(words[2], self._secret):
            sock.close()
            return
        peer.sock, peer.heard = sock, time.monotonic()
        self._handle(peer, rest)

    def _hear(self, peer: _Peer) -> None:
        data = _receive(peer.sock)
        if data is None:  # a peer that said goodbye is no longer watched: this one died, unless we are closing
            if not self._closing.is_set():
                self.fail(f"{self.describe(peer.rank)} exited (its liveness connection closed)")
            return  # failing or closing: the watch ends
        peer.heard = time.monotonic()
        self._handle(peer, data)

    def _handle(self, peer: _Peer, data: bytes) -> None:
        *lines, peer.buffer = (peer.buffer + data).split(b"\n")
        for word, rest in _messages(lines):
            if word == "bye":
                peer.left = True
            elif word == "failed":
                self.fail(rest)

    def _check(self) -> None:
        now = time.monotonic()
        for peer in self._peers.values():
            if not peer.left and now - peer.heard > self.heartbeat_timeout_s:
                what = "sent no heartbeat" if peer.sock else "did not connect"
                self.fail(f"{self.describe(peer.rank)} {what} for {now - peer.heard:.0f} s "
                          f"(server.heartbeat_timeout_s={self.heartbeat_timeout_s:g}): hung or unreachable")
        started = self.engine.step_started if self.engine is not None else None
        if started is not None and now - started > self.step_timeout_s:
            quiet = [f"{self.describe(p.rank)} silent for {now - p.heard:.0f} s" for p in self._peers.values()
                     if now - p.heard > 1.5 * self.interval_s]
            self.fail(f"a step of replica {self.ps.replica} ran for {now - started:.0f} s without finishing "
                      f"(server.step_timeout_s={self.step_timeout_s:g}): "
                      + (f"hung: {', '.join(quiet)}" if quiet else "a rank is hung"))

    # ---- a follower

    def _beat(self) -> None:
        me, leader = self.describe(self.ps.world_rank), self.describe(self.ps.first_rank)
        self._send(self._leader, f"hello {self.ps.world_rank} {self._secret}")
        heard = next_beat = time.monotonic()  # the first beat goes at once
        buffer = b""
        while not self._closing.is_set():
            readable, _, _ = select.select([self._leader], [], [], POLL_S)
            data = _receive(self._leader) if readable else b""
            if data is None:
                if self._closing.is_set():
                    return
                self.fail(f"{me} lost its leader, {leader}: the connection closed (the leader exited)")
            if data:
                heard = time.monotonic()
                *lines, buffer = (buffer + data).split(b"\n")
                for word, rest in _messages(lines):
                    if word == "failed":
                        self.fail(rest)
                    if word == "bye":
                        return  # the leader ended normally; this rank's main thread ends on its shutdown
            silent = time.monotonic() - heard
            if silent > self.heartbeat_timeout_s:
                self.fail(f"{me} heard nothing from its leader, {leader}, for {silent:.0f} s "
                          f"(server.heartbeat_timeout_s={self.heartbeat_timeout_s:g}): hung or unreachable")
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.interval_s
                if not self._send(self._leader, "beat") and not self._closing.is_set():
                    self.fail(f"{me} lost its leader, {leader}: it cannot be reached")

    def _send(self, sock: Optional[socket.socket], message: str) -> bool:
        if sock is None:
            return False
        with self._send_lock:
            try:
                sock.sendall(message.replace("\n", " ").encode() + b"\n")
                return True
            except OSError:  # the peer is gone; whoever watches it tells the story
                return False


def _messages(lines: list[bytes]):
    for line in lines:
        word, _, rest = line.decode(errors="replace").partition(" ")
        yield word, rest


def _receive(sock: socket.socket) -> Optional[bytes]:
    """What arrived, or None when the peer closed the connection (or it broke)."""
    try:
        data = sock.recv(4096)
    except OSError:
        return None
    return data or None
