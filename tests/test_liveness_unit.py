"""The liveness protocol between a leader and a follower, over real sockets in one process (no model): who is
declared failed, and why. A recorded failure stands in for the exit a real rank makes."""
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

    def fail(self, reason):
        if not self.failed.is_set():
            self.reason = reason
            self.failed.set()
        self._closing.set()


def state(rank: int) -> ParallelState:
    return ParallelState(world_rank=rank, replica=0, tp_rank=rank, tp_size=2, pp_rank=0, pp_size=1, tp_group=None,
                         pp_group=None, replica_group=None, replica_ranks=(0, 1), device=torch.device("cpu"),
                         backend="gloo")


def make(rank: int, tmp_path, step_timeout_s: float = 60.0) -> Recorded:
    side = Recorded(state(rank), ["nodeA", "nodeB"], TIMEOUT_S, step_timeout_s, tmp_path, SECRET)
    side.failed, side.reason = threading.Event(), None
    return side


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


def test_ranks_that_beat_outlive_the_timeout_and_part_without_a_failure(tmp_path):
    leader, port = start_leader(tmp_path)
    follower = start_follower(tmp_path, port)
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


def test_a_step_past_the_step_timeout_fails_the_replica(tmp_path):
    leader, port = start_leader(tmp_path, step_timeout_s=2.0)
    follower = start_follower(tmp_path, port)
    try:
        leader.engine = type("Engine", (), {"step_started": time.monotonic()})()
        assert leader.failed.wait(4 * TIMEOUT_S)
        assert "without finishing (server.step_timeout_s=2)" in leader.reason
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
