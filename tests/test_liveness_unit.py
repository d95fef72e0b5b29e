"""The liveness protocol between a leader and a follower, over real sockets in one process (no model): who is
declared failed, and why. A recorded failure stands in for the exit a real rank makes."""
import json
import select
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve import liveness as liveness_module
from fleetgen.model.serve.liveness import Liveness

TIMEOUT_S = 1.5
SECRET = "s3cret"


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    """The liveness threads look at the clock ten times as often: close() and the timeouts are seen sooner."""
    monkeypatch.setattr(liveness_module, "POLL_S", liveness_module.POLL_S / 10)


class Recorded(Liveness):
    """fail() records the first reason and stops the liveness thread instead of ending the process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failed, self.reason, self.reasons = threading.Event(), None, []

    def fail(self, reason):
        self.reasons.append(reason)
        if not self.failed.is_set():
            self.reason = reason
            self.failed.set()
        self._closing.set()


def state(rank: int, ranks: tuple = (0, 1), replica: int = 0) -> ParallelState:
    return ParallelState(world_rank=rank, replica=replica, tp_rank=rank - ranks[0], tp_size=len(ranks), pp_rank=0,
                         pp_size=1, tp_group=None, pp_group=None, replica_group=None, replica_ranks=ranks,
                         device=torch.device("cpu"), backend="gloo")


def make(rank: int, tmp_path, step_timeout_s: float = 60.0, heartbeat_s: float = TIMEOUT_S, ranks: tuple = (0, 1),
         secret: str = SECRET) -> Recorded:
    nodes = ["nodeA", "nodeB", "nodeC"][:len(ranks)]
    return Recorded(state(rank, ranks), nodes, heartbeat_s, step_timeout_s, tmp_path, secret)


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
        assert leader.reason.startswith("rank 1 on nodeB sent no heartbeat for ")  # its seconds: see the clock's test
        assert "s (server.heartbeat_timeout_s=1.5): hung or unreachable" in leader.reason
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
    leader, port = start_leader(tmp_path, step_timeout_s=0.5)
    follower = start_follower(tmp_path, port)
    try:
        leader.engine = type("Engine", (), {"step_started": time.monotonic()})()
        assert leader.failed.wait(4 * TIMEOUT_S)
        assert "without finishing (server.step_timeout_s=0.5)" in leader.reason
    finally:
        follower.close()


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



# ---- one piece at a time: a clock the test sets, the loops run turn by turn, the messages of one connection


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """The liveness module's monotonic clock, set by the test (the test's own clock runs on)."""
    clock = Clock()
    monkeypatch.setattr(liveness_module, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=time.sleep))
    return clock


def run_turns(monkeypatch, side: Liveness, clock: Clock, times: list, loop, *args, before_each=lambda: None):
    """Runs a liveness loop here, one turn per entry of `times`: each select() answers at once what is ready and sets
    the clock to the turn's time; the loop ends after the last turn. Every message sent is recorded with its time."""
    pending, sent = list(times), []

    def select_at_once(readers, writers, errors, timeout):
        before_each()
        clock.now = pending.pop(0)
        if not pending:
            side._closing.set()
        return select.select(readers, writers, errors, 0)

    monkeypatch.setattr(liveness_module, "select", SimpleNamespace(select=select_at_once))
    monkeypatch.setattr(side, "_send", lambda sock, message: sent.append((clock.now, message)) or True)
    loop(*args)
    return sent


def is_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True


def test_the_leader_beats_every_interval_and_drops_a_stranger_once_its_hello_time_is_past(
        tmp_path, monkeypatch, clock):
    leader = make(0, tmp_path, heartbeat_s=60.0)  # a beat every 10 s
    ours, theirs = socket.socketpair()
    leader._peers = {1: liveness_module._Peer(1, "nodeB", heard=100.0, sock=ours)}
    listener = socket.create_server(("127.0.0.1", 0))
    stranger = socket.create_connection(listener.getsockname())  # says nothing
    seen = []
    sent = run_turns(monkeypatch, leader, clock, [100.0, 105.0, 110.0, 110.5, 111.0], leader._watch, listener,
                     before_each=lambda: seen.append(is_open(stranger)))
    assert sent == [(100.0, "beat"), (110.0, "beat")]  # due at 100, then at 110 exactly
    assert seen == [True, True, True, True, False]  # accepted at 100: kept at 110 (10 s), dropped past it
    assert listener.fileno() == -1 and leader.reasons == []  # the watch closes its listener when it ends


def test_a_follower_beats_every_interval_and_fails_once_its_leader_is_silent_past_the_timeout(
        tmp_path, monkeypatch, clock):
    follower = make(1, tmp_path, heartbeat_s=6.0)  # a beat every second
    follower._leader, theirs = socket.socketpair()
    sent = run_turns(monkeypatch, follower, clock, [100.0, 100.5, 101.0, 101.5, 102.25, 106.0, 107.0], follower._beat)
    assert sent == [(100.0, "hello 1 s3cret"), (100.0, "beat"), (101.0, "beat"), (102.25, "beat"), (106.0, "beat"),
                    (107.0, "beat")]
    assert follower.reasons == ["rank 1 on nodeB heard nothing from its leader, rank 0 on nodeA, for 7 s "
                                "(server.heartbeat_timeout_s=6): hung or unreachable"]  # 6 s of silence is not past


def test_the_leader_names_a_rank_silent_past_the_heartbeat_timeout_with_its_seconds(tmp_path, clock):
    leader = make(0, tmp_path, heartbeat_s=6.0, ranks=(0, 1, 2))
    ours, theirs = socket.socketpair()
    leader._peers = {1: liveness_module._Peer(1, "nodeB", heard=100.0, sock=ours),
                     2: liveness_module._Peer(2, "nodeC", heard=0.0, left=True)}  # said goodbye: not watched
    clock.now = 106.0
    leader._check()
    assert leader.reasons == []  # silent for exactly the timeout: not past it
    clock.now = 107.0
    leader._check()
    assert leader.reasons == ["rank 1 on nodeB sent no heartbeat for 7 s (server.heartbeat_timeout_s=6): hung or "
                              "unreachable"]
    leader._peers[1].sock = None
    leader._check()
    assert leader.reasons[1].startswith("rank 1 on nodeB did not connect for 7 s")


def test_a_step_past_its_timeout_names_the_ranks_silent_for_more_than_one_and_a_half_beats(tmp_path, clock):
    leader = make(0, tmp_path, heartbeat_s=6.0, step_timeout_s=2.0, ranks=(0, 1, 2))  # a beat a second each way
    leader._peers = {1: liveness_module._Peer(1, "nodeB", heard=108.5),
                     2: liveness_module._Peer(2, "nodeC", heard=108.0)}
    leader.engine = SimpleNamespace(step_started=None)
    clock.now = 110.0
    leader._check()  # an idle engine is never timed
    leader.engine.step_started = 108.0
    leader._check()  # a step of exactly its timeout
    assert leader.reasons == []
    leader.engine.step_started = 105.0
    leader._check()
    assert leader.reasons == ["a step of replica 0 ran for 5 s without finishing (server.step_timeout_s=2): "
                              "hung: rank 2 on nodeC silent for 2 s"]  # 1.5 s is one and a half beats: not quiet
    leader._peers[2].heard = 110.0
    leader._check()
    assert leader.reasons[1].endswith("(server.step_timeout_s=2): a rank is hung")


@pytest.mark.parametrize("size, taken", [(256, True), (257, False)], ids=["max-hello-bytes", "one-byte-more"])
def test_a_hello_of_max_hello_bytes_before_its_end_of_line_is_taken_and_one_byte_more_is_dropped(
        tmp_path, size, taken):
    line = "hello 1 " + "s" * (size - len("hello 1 "))  # 256: MAX_HELLO_BYTES
    leader = make(0, tmp_path, secret=line.split()[2])
    leader._peers = {1: liveness_module._Peer(1, "nodeB", heard=100.0)}
    ours, theirs = socket.socketpair()
    strangers = {ours: [b"", 110.0]}
    theirs.sendall(line.encode())
    leader._greet(ours, strangers)
    assert strangers == {ours: [line.encode(), 110.0]}  # no end of line yet: waiting for it
    theirs.sendall(b"\n")
    leader._greet(ours, strangers)
    assert (strangers, leader._peers[1].sock is ours, is_open(theirs)) == ({}, taken, taken)


def test_what_follows_a_hello_in_the_same_piece_is_heard(tmp_path):
    leader = make(0, tmp_path)
    leader._peers = {1: liveness_module._Peer(1, "nodeB", heard=100.0)}
    ours, theirs = socket.socketpair()
    strangers = {ours: [b"", 110.0]}
    theirs.sendall(b"hello 1 s3cret\nbeat\nbye\nbe")
    leader._greet(ours, strangers)
    peer = leader._peers[1]
    assert (strangers, peer.sock, peer.left, peer.buffer) == ({}, ours, True, b"be")  # "be": the start of a line


def test_start_in_a_later_replica_of_three_ranks_watches_its_followers_on_their_nodes(tmp_path, monkeypatch):
    ranks = (3, 4, 5)
    others = {4: ("nodeE", "?", 0, "rank 4's"), 5: ("nodeF", "?", 0, "rank 5's")}
    published = []

    def all_gather_object(out, mine, group):  # the leader (rank 3) starts first, then rank 5
        published.append(mine)
        out[:] = [published[0], others[4], mine if len(published) > 1 else others[5]]

    monkeypatch.setattr(liveness_module.dist, "all_gather_object", all_gather_object)
    leader = Recorded.start(state(3, ranks, replica=1), "nodeD", "127.0.0.1", 60.0, 60.0, tmp_path)
    follower = Recorded.start(state(5, ranks, replica=1), "nodeF", "ignored", 60.0, 60.0, tmp_path)
    try:
        assert leader.nodes == follower.nodes == ["nodeD", "nodeE", "nodeF"]
        assert {r: p.node for r, p in leader._peers.items()} == {4: "nodeE", 5: "nodeF"}
        assert follower._secret == leader._secret and len(bytes.fromhex(leader._secret)) == 16  # 128 random bits
        deadline = time.monotonic() + 4 * TIMEOUT_S
        while leader._peers[5].sock is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leader._peers[5].sock is not None and leader._peers[4].sock is None
    finally:
        follower.close()
        leader.close()
    assert (leader.reasons, follower.reasons) == ([], [])


def test_the_leaders_of_two_replicas_on_one_node_listen_on_ports_of_their_own(tmp_path, monkeypatch):
    published = []
    monkeypatch.setattr(liveness_module.dist, "all_gather_object",
                        lambda out, mine, group: published.append(mine) or out.__setitem__(slice(None), [mine, mine]))
    first = Recorded.start(state(0), "nodeA", "127.0.0.1", 60.0, 60.0, tmp_path)
    second = Recorded.start(state(2, (2, 3), replica=1), "nodeA", "127.0.0.1", 60.0, 60.0, tmp_path)
    first.close()
    second.close()
    assert published[0][2] != published[1][2]


def test_a_replica_of_one_rank_opens_no_port(tmp_path, monkeypatch):
    monkeypatch.setattr(liveness_module.socket, "create_server", None)  # called, it would raise
    alone = state(0, (0,))
    leader = Recorded.start(alone, "nodeA", "127.0.0.1", TIMEOUT_S, 60.0, tmp_path)
    leader.close()
    assert leader.reasons == []


def test_a_rank_of_a_later_replica_fails_with_its_own_node(tmp_path, monkeypatch):
    monkeypatch.setattr(liveness_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(liveness_module.os, "_exit", lambda code: None)
    rank = Liveness(state(3, (2, 3), replica=1), ["nodeC", "nodeD"], TIMEOUT_S, 60.0, tmp_path, SECRET)
    rank.fail("out of memory")
    [written] = tmp_path.rglob("*.json")
    assert json.loads(written.read_text()) == {"rank": 3, "node": "nodeD", "reason": "replica 1 failed: out of memory"}
    again = threading.Thread(target=rank.fail, args=("again",), daemon=True)
    again.start()
    again.join(0.2)
    assert again.is_alive()  # a second failure waits for the first to end the process
    assert json.loads(written.read_text())["reason"] == "replica 1 failed: out of memory"


def test_close_says_goodbye_on_every_connection_and_ends_the_followers(tmp_path):
    leader = make(0, tmp_path, ranks=(0, 1, 2))
    pairs = [socket.socketpair() for _ in range(2)]
    leader._peers = {1: liveness_module._Peer(1, "nodeB", heard=0.0, sock=pairs[0][0]),
                     2: liveness_module._Peer(2, "nodeC", heard=0.0, sock=pairs[1][0])}
    leader.close()
    assert [theirs.recv(100) for _, theirs in pairs] == [b"bye\n", b"bye\n"]
    follower = make(1, tmp_path)
    follower._leader, theirs = socket.socketpair()
    theirs.settimeout(4 * TIMEOUT_S)
    follower.close()
    assert (theirs.recv(100), theirs.recv(100)) == (b"bye\n", b"")  # and shut down: its beating thread wakes
    broken = make(1, tmp_path)
    broken._leader = socket.socket()  # never connected: nothing can be sent or shut down
    broken.close()
    assert follower.reasons == broken.reasons == []


def test_messages_and_connections_that_cannot_be_used(tmp_path):
    leader = make(0, tmp_path)
    ours, theirs = socket.socketpair()
    assert (leader._send(None, "beat"), leader._send(ours, "beat"), theirs.recv(100)) == (False, True, b"beat\n")
    theirs.close()
    assert leader._send(ours, "beat" * 100_000) is False  # the peer is gone
    assert liveness_module._receive(ours) is None
    ours.close()
    assert liveness_module._receive(ours) is None  # it broke here
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    strangers = {}
    leader._accept(listener, strangers)  # nobody is there after all
    assert strangers == {}
    listener.close()
