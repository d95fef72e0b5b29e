"""A replica whose rank dies or hangs is known at once: /health says failed naming the rank, requests get 503,
every rank exits and the launcher reports why; an idle replica is never timed out. Local executor, real ranks."""
import signal
import socket
import threading
import time

import pytest
import requests

from tests.job_faults import LONG_REQUEST, Serving, continue_or_kill, nothing_left, wait_for_failed_health

pytestmark = pytest.mark.slow

HOST = socket.gethostname()
HEARTBEAT = ["server.heartbeat_timeout_s=6"]
MARGIN_S = 30  # detection needs the timeout plus a poll or two; the machine is shared and slow


def start_long_request(url: str) -> dict:
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=requests.put(f"{url}/generate", json=LONG_REQUEST)))
    thread.start()
    answer["thread"] = thread
    time.sleep(0.5)  # it is running: admitted (a local PUT takes milliseconds), and decoding its 440 tokens
    assert thread.is_alive(), "the request finished before the fault: make it longer"
    return answer


def assert_replica_failed(serving: Serving, answer: dict | None, expected: str, timeout: float):
    health = wait_for_failed_health(serving.urls[0], timeout)
    assert expected in health["error"], health
    if answer is not None:
        answer["thread"].join(timeout)
        assert answer["r"].status_code == 503 and expected in answer["r"].json()["error"], answer["r"].text
    new = requests.put(f"{serving.urls[0]}/generate", json={"sentences": ["x"]}, timeout=10)
    assert new.status_code == 503 and expected in new.json()["error"]
    assert serving.exit_code(timeout=120) == 2
    assert expected in serving.stderr()  # "every replica failed: ..." or "ended while serving ... Ranks that exited"


@pytest.mark.parametrize("split", [["parallel.tensor=2"], ["parallel.pipeline=2"]], ids=["tensor2", "pipeline2"])
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-request"])
def test_a_stopped_follower_fails_its_replica(tmp_path, split, busy):
    serving = Serving(tmp_path, "tiny", *split, *HEARTBEAT)
    follower = serving.rank_process(1)
    try:
        answer = start_long_request(serving.urls[0]) if busy else None
        follower.send_signal(signal.SIGSTOP)
        assert_replica_failed(serving, answer, f"rank 1 on {HOST} sent no heartbeat", 6 + MARGIN_S)
    finally:
        continue_or_kill(follower)
        serving.stop()
    assert nothing_left(str(tmp_path)) == []


def test_a_killed_follower_fails_its_replica_mid_request(tmp_path):
    serving = Serving(tmp_path, "tiny", "parallel.tensor=2", *HEARTBEAT)
    try:
        answer = start_long_request(serving.urls[0])
        serving.rank_process(1).kill()
        assert_replica_failed(serving, answer, f"rank 1 on {HOST} exited", MARGIN_S)
    finally:
        serving.stop()
    assert nothing_left(str(tmp_path)) == []


@pytest.mark.parametrize("split", [["parallel.tensor=2"], ["parallel.pipeline=2"]], ids=["tensor2", "pipeline2"])
@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_lost_leader_ends_its_followers_and_the_job(tmp_path, split, fault):
    # the followers' side of liveness: no test of a follower's fault reaches it
    serving = Serving(tmp_path, "tiny", *split, *HEARTBEAT)
    leader, follower = serving.rank_process(0), serving.rank_process(1)
    try:
        leader.send_signal(fault)
        follower.wait(timeout=(6 if fault == signal.SIGSTOP else 0) + MARGIN_S)  # it exits by itself
        assert serving.exit_code(timeout=60) == 2
        why = "heard nothing from its leader" if fault == signal.SIGSTOP else "lost its leader"
        assert f"rank 1 on {HOST} {why}, rank 0 on {HOST}" in serving.stderr(), serving.stderr()
    finally:
        continue_or_kill(leader)
        serving.stop()
    assert nothing_left(str(tmp_path)) == []


def test_a_step_that_never_finishes_fails_its_replica(tmp_path):
    # heartbeats would notice after 30 s; the step watchdog does after 12 s and names the silent rank
    serving = Serving(tmp_path, "tiny", "parallel.tensor=2", "server.heartbeat_timeout_s=30",
                      "server.step_timeout_s=12")
    follower = serving.rank_process(1)
    try:
        answer = start_long_request(serving.urls[0])
        follower.send_signal(signal.SIGSTOP)
        assert_replica_failed(serving, answer, "server.step_timeout_s=12", 12 + MARGIN_S)
        assert f"rank 1 on {HOST} silent" in serving.stderr()
    finally:
        continue_or_kill(follower)
        serving.stop()
    assert nothing_left(str(tmp_path)) == []


@pytest.mark.parametrize("dist_timeout", [[], ["server.dist_timeout_s=6"]], ids=["default", "short-collectives"])
def test_an_idle_replica_outlives_every_timeout_and_still_answers(tmp_path, dist_timeout):
    # short-collectives: an idle follower waits in a broadcast that would time out after 6 s without idle signals
    serving = Serving(tmp_path, "tiny", "parallel.tensor=2", "server.heartbeat_timeout_s=3",
                      "server.step_timeout_s=3", *dist_timeout)
    try:
        time.sleep(15)
        assert requests.get(f"{serving.urls[0]}/health").json()["status"] == "ready"
        answer = requests.put(f"{serving.urls[0]}/generate", json={"sentences": ["Once upon"],
                                                                    "tokens_to_generate": 4, "greedy": True})
        assert answer.status_code == 200 and len(answer.json()["token_ids"][0]) > 4
        assert serving.proc.poll() is None
    finally:
        serving.stop()
    assert serving.exit_code(timeout=10) == 130
    assert nothing_left(str(tmp_path)) == []
