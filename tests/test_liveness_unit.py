"""The liveness protocol between a leader and a follower, over real sockets in one process (no model): who is
declared failed, and why. A recorded failure stands in for the exit a real rank makes."""
import json
import socket
import threading
import time

import pytest
import torch

from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve import liveness as liveness_module
from fleetgen.model.serve.liveness import Liveness

TIMEOUT_S = 3.0
SECRET = "s3cret"


class Recorded(Liveness):
    """fail() records the first reason and stops the liveness thread instead of ending the process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failed, self.reason = threading.Event(), None

    def fail(self, reason):
        if not self.failed.is_set():
            self.reason = reason
            self.failed.set()
        self._closing.set()


def state(rank: int) -> ParallelState:
    return ParallelState(world_rank=rank, replica=0, tp_rank=rank, tp_size=2, pp_rank=0, pp_size=1, tp_group=None,
                         pp_group=None, replica_group=None, replica_ranks=(0, 1), device=torch.device("cpu"),
                         backend="gloo")


def make(rank: int, tmp_path, step_timeout_s: float = 60.0, heartbeat_s: float = TIMEOUT_S) -> Recorded:
    return Recorded(state(rank), ["nodeA", "nodeB"], heartbeat_s, step_timeout_s, tmp_path, SECRET)


def start_leader(tmp_path, **kwargs):
    leader = make(0, tmp_path, **kwargs)
    listener = socket.create_server(("127.0.0.1", 0))
    leader._peers = {1: liveness_module._Peer(1, "nodeB", heard=time.monotonic())}
    leader._thread = threading.Thread(target=leader._watch, args=(listener,), daemon=True)
    leader._thread.start()
    return leader, listener.getsockname()[1]


def start_follower(tmp_path, port: int) -> Recorded:
    follower = make(1, tmp_path)
    follower._leader = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    follower._thread = threading.Thread(target=follower._beat, daemon=True)
    follower._thread.start()
    return follower


def hello(port: int, secret: str = SECRET) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"hello 1 {secret}\n".encode())
    return sock


def test_a_replica_of_one_rank_starts_alone_without_a_collective_or_a_port(tmp_path, monkeypatch):
    monkeypatch.setattr(liveness_module.dist, "all_gather_object", None)  # called, it would raise
    alone = ParallelState(world_rank=0, replica=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, tp_group=None,
                          pp_group=None, replica_group=None, replica_ranks=(0,), device=torch.device("cpu"),
                          backend="none")
    leader = Recorded.start(alone, "nodeA", "127.0.0.1", TIMEOUT_S, 60.0, tmp_path)
    assert (leader.nodes, leader._peers, leader._leader, leader.interval_s) == (["nodeA"], {}, None, TIMEOUT_S / 6)
    leader.close()
    assert leader.reason is None and not leader._thread.is_alive()  # close() returns once the watcher ended
    assert leader._thread.daemon  # it never keeps a rank's process alive


def test_a_rank_is_named_with_its_own_node_in_a_replica_past_the_first(tmp_path):
    second = ParallelState(world_rank=3, replica=1, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1, tp_group=None,
                           pp_group=None, replica_group=None, replica_ranks=(2, 3), device=torch.device("cpu"),
                           backend="gloo")
    side = Liveness(second, ["nodeC", "nodeD"], TIMEOUT_S, 60.0, tmp_path, SECRET)
    assert (side.describe(2), side.describe(3)) == ("rank 2 on nodeC", "rank 3 on nodeD")


def test_start_gathers_the_nodes_and_connects_the_follower_to_its_leader_with_the_leaders_secret(
        tmp_path, monkeypatch):
    published = []  # what each rank put in, in the order the ranks start (the leader first)

    def all_gather_object(out, mine, group):
        published.append(mine)
        out[:] = [published[0], mine if len(published) > 1 else ("nodeB", "?", 0, "the follower's")]

    monkeypatch.setattr(liveness_module.dist, "all_gather_object", all_gather_object)
    leader = Recorded.start(state(0), "nodeA", "127.0.0.1", TIMEOUT_S, 60.0, tmp_path)
    follower = Recorded.start(state(1), "nodeB", "ignored", TIMEOUT_S, 60.0, tmp_path)
    try:
        assert leader.nodes == follower.nodes == ["nodeA", "nodeB"] and follower._secret == leader._secret
        assert published[0][2] > 0 and published[1][2] == 0  # only the leader listens
        deadline = time.monotonic() + 4 * TIMEOUT_S
        while leader._peers[1].sock is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leader._peers[1].sock is not None  # the follower's hello was taken
    finally:
        follower.close()
        leader.close()
    assert (leader.reason, follower.reason) == (None, None)


def test_a_failing_rank_tells_the_others_writes_its_last_word_answers_503_for_a_while_and_exits_1(
        tmp_path, monkeypatch):
    slept, exits = [], []
    monkeypatch.setattr(liveness_module.time, "sleep", slept.append)
    monkeypatch.setattr(liveness_module.os, "_exit", exits.append)
    leader = Liveness(state(0), ["nodeA", "nodeB"], TIMEOUT_S, 60.0, tmp_path, SECRET)
    ours, theirs = socket.socketpair()
    leader._peers = {1: liveness_module._Peer(1, "nodeB", heard=time.monotonic(), sock=ours)}
    told = []
    leader.on_failure = told.append
    leader.fail("rank 1 on nodeB exited\n(its connection closed)")
    assert theirs.recv(100) == b"failed rank 1 on nodeB exited (its connection closed)\n"  # one line
    assert told == ["rank 1 on nodeB exited\n(its connection closed)"]
    assert (slept, exits) == ([5.0], [1])  # 503 for 5 s, as the README says, then exit 1
    [written] = tmp_path.rglob("*.json")
    assert json.loads(written.read_text()) == {"rank": 0, "node": "nodeA", "reason":
                                               "replica 0 failed: rank 1 on nodeB exited\n(its connection closed)"}
    follower = Liveness(state(1), ["nodeA", "nodeB"], TIMEOUT_S, 60.0, tmp_path / "f", SECRET)
    follower._leader = theirs
    follower.fail("lost")  # no server to answer 503: it exits at once
    assert ours.recv(100) == b"failed lost\n" and (slept, exits) == ([5.0], [1, 1])


def test_an_engine_failure_waits_a_moment_for_the_watcher_to_name_a_dead_peer(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr(liveness_module.time, "sleep", slept.append)
    leader = make(0, tmp_path)
    leader.fail_engine("RuntimeError: gloo connection closed")
    assert slept == [1.0]
    assert leader.reason == "rank 0 on nodeA: RuntimeError: gloo connection closed"


@pytest.mark.parametrize("hello_line", [b"hello 1\n", b"hello one s3cret\n", b"hi 1 s3cret\n", b"hello 7 s3cret\n",
                                        b"hello 1 s3cret extra\n", b"x" * 300],
                         ids=["short", "not-a-rank", "not-hello", "unknown-rank", "long", "no-end-of-line"])
def test_a_connection_that_does_not_say_a_known_ranks_hello_is_dropped(tmp_path, hello_line):
    leader, port = start_leader(tmp_path)
    stranger = socket.create_connection(("127.0.0.1", port))
    try:
        stranger.sendall(hello_line)
        if not hello_line.endswith(b"\n"):  # too long a line: dropped at its next piece
            time.sleep(0.2)
            stranger.sendall(b"y")
        assert stranger.recv(100) == b""  # the leader closed it
        assert leader._peers[1].sock is None
    finally:
        stranger.close()
        leader.close()


def test_a_follower_ends_on_its_leaders_goodbye_and_fails_on_its_leaders_failure(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    ended = start_follower(tmp_path, server.getsockname()[1])
    failing = start_follower(tmp_path, server.getsockname()[1])
    first, _ = server.accept()
    second, _ = server.accept()
    try:
        assert first.recv(100).startswith(b"hello 1 s3cret\n")
        first.sendall(b"beat\nbye\n")
        ended._thread.join(4 * TIMEOUT_S)
        second.sendall(b"failed rank 0 on nodeA: out of memory\n")
        assert failing.failed.wait(4 * TIMEOUT_S)
        assert (not ended._thread.is_alive(), ended.reason) == (True, None)
        assert failing.reason == "rank 0 on nodeA: out of memory"
    finally:
        first.close()
        second.close()
        server.close()


def test_ranks_that_beat_outlive_the_timeout_and_part_without_a_failure(tmp_path):
    leader, port = start_leader(tmp_path, step_timeout_s=60.0)
    follower = start_follower(tmp_path, port)
    leader.engine = type("Engine", (), {"step_started": time.monotonic()})()  # a long step, within its timeout
    time.sleep(2.5 * TIMEOUT_S)
    follower.close()
    leader.close()
    assert (leader.reason, follower.reason) == (None, None)
    assert not list(tmp_path.glob("rank-*.exit.json"))


def test_a_silent_follower_is_named_after_the_heartbeat_timeout(tmp_path):
    leader, port = start_leader(tmp_path)
    sock = hello(port)  # says hello, then nothing, as a SIGSTOPped rank does
    try:
        assert leader.failed.wait(4 * TIMEOUT_S)
        assert leader.reason.startswith("rank 1 on nodeB sent no heartbeat for 3 s")
    finally:
        sock.close()


def test_a_connection_that_says_nothing_is_dropped_after_the_hello_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(liveness_module, "HELLO_TIMEOUT_S", 0.5)
    leader, port = start_leader(tmp_path)
    silent = socket.create_connection(("127.0.0.1", port))
    try:
        silent.settimeout(4 * TIMEOUT_S)
        assert silent.recv(100) == b""  # the leader closed it
        assert leader.reason is None
    finally:
        silent.close()
        leader.close()


def test_a_follower_whose_connection_closes_without_a_goodbye_has_exited(tmp_path):
    leader, port = start_leader(tmp_path)
    hello(port).close()
    assert leader.failed.wait(4 * TIMEOUT_S)
    assert leader.reason == "rank 1 on nodeB exited (its liveness connection closed)"


def test_a_stranger_without_the_secret_is_dropped_and_never_counts_as_the_rank(tmp_path):
    leader, port = start_leader(tmp_path)
    stranger = hello(port, secret="guess")
    try:
        assert stranger.recv(100) == b""  # the leader closed it
        assert leader.failed.wait(4 * TIMEOUT_S)
        assert "rank 1 on nodeB did not connect" in leader.reason
    finally:
        stranger.close()


def test_a_follower_that_loses_its_leader_says_so(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    follower = start_follower(tmp_path, server.getsockname()[1])
    conn, _ = server.accept()
    conn.close()  # the leader died
    server.close()
    assert follower.failed.wait(4 * TIMEOUT_S)
    assert follower.reason.startswith("rank 1 on nodeB lost its leader, rank 0 on nodeA")


def test_a_follower_that_cannot_reach_its_leader_says_so(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    follower = make(1, tmp_path)
    follower._leader = socket.create_connection(("127.0.0.1", server.getsockname()[1]))
    conn, _ = server.accept()
    follower._leader.shutdown(socket.SHUT_WR)  # its beats cannot be sent, though nothing closed on it
    follower._thread = threading.Thread(target=follower._beat, daemon=True)
    follower._thread.start()
    try:
        assert follower.failed.wait(4 * TIMEOUT_S)
        assert follower.reason == "rank 1 on nodeB lost its leader, rank 0 on nodeA: it cannot be reached"
    finally:
        conn.close()
        server.close()


def test_a_step_past_the_step_timeout_fails_the_replica(tmp_path):
    leader, port = start_leader(tmp_path, step_timeout_s=2.0)
    follower = start_follower(tmp_path, port)
    try:
        leader.engine = type("Engine", (), {"step_started": time.monotonic()})()
        assert leader.failed.wait(4 * TIMEOUT_S)
        assert "without finishing (server.step_timeout_s=2)" in leader.reason
    finally:
        follower.close()


@pytest.mark.parametrize("silent_s, story", [(0.0, "=1): a rank is hung"),
                                             (2.0, "=1): hung: rank 1 on nodeB silent for ")])
def test_a_step_timeout_names_the_ranks_silent_for_more_than_one_and_a_half_beats(tmp_path, silent_s, story):
    leader, port = start_leader(tmp_path, heartbeat_s=6.0, step_timeout_s=1.0)  # a beat a second each way
    sock = hello(port)
    try:
        time.sleep(silent_s + 0.1)
        leader.engine = type("Engine", (), {"step_started": time.monotonic() - 10})()
        assert leader.failed.wait(4 * TIMEOUT_S)
        assert story in leader.reason, leader.reason
    finally:
        sock.close()


@pytest.mark.parametrize("message", ["failed rank 1 on nodeB: RuntimeError: out of memory"])
def test_a_followers_own_failure_becomes_the_replicas(tmp_path, message):
    leader, port = start_leader(tmp_path)
    sock = hello(port)
    try:
        sock.sendall(f"{message}\n".encode())
        assert leader.failed.wait(4 * TIMEOUT_S)
        assert leader.reason == message.removeprefix("failed ")
    finally:
        sock.close()

