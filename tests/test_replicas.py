"""Two replicas on one machine: each serves on its own port; a rank that fails while loading fails the launch
at once with its error, instead of after server.health_timeout_s."""
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from fleetgen.launcher.config import parse_config as parse
from fleetgen.launcher.errors import LaunchError
from tests.job_faults import Serving, nothing_left, wait_for_failed_health

# Injected into every process of the job through PYTHONPATH: rank 1 (replica 1) cannot load.
FAULTY_RANK = """
import os
if os.environ.get("SUBMITIT_LOCAL_GLOBALID") == "1":
    import fleetgen.model.load as load

    def build_generator(*args, **kwargs):
        raise RuntimeError("injected fault: rank 1 cannot read its shard")

    load.build_generator = build_generator
"""


def two_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("", 0))
            try:
                b.bind(("", a.getsockname()[1] + 1))
            except OSError:
                continue
            return a.getsockname()[1]
    raise AssertionError("no two consecutive free ports")


def test_replica_ports_past_65535_are_refused_before_submission():
    cfg = {"recipe": "r", "cluster": {"kind": "local"}, "model": {"checkpoint": "c"}, "parallel": {"replicas": 4}}
    assert parse({**cfg, "server": {"port": 65532}}).server.port == 65532
    with pytest.raises(LaunchError, match=r"server.port=65533 \+ parallel.replicas=4 - 1 = 65536"):
        parse({**cfg, "server": {"port": 65533}})


@pytest.mark.slow
def test_two_replicas_with_an_explicit_port_serve_on_port_and_port_plus_one(tmp_path):
    port = two_free_ports()
    serving = Serving(tmp_path, "tiny", "parallel.replicas=2", f"server.port={port}")
    try:
        assert serving.urls == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        for url in serving.urls:
            answer = requests.put(f"{url}/generate", json={"sentences": ["Once upon"], "tokens_to_generate": 3,
                                                          "greedy": True})
            assert answer.status_code == 200 and answer.json()["sentences"][0].startswith("Once upon")
    finally:
        serving.stop()
    assert serving.exit_code(timeout=10) == 130
    assert nothing_left(str(tmp_path)) == []


@pytest.mark.slow
def test_a_rank_that_fails_while_loading_fails_a_two_replica_launch_at_once(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULTY_RANK)
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}:{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", "parallel.replicas=2",
                             "job.folder=jobs"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, **env})
    assert result.returncode == 2
    # the failed leader reports through its health endpoint, then exits: the launcher may see either first
    assert ("a rank exited before the job was healthy" in result.stderr
            or "a replica failed before it was healthy" in result.stderr), result.stderr
    assert "injected fault: rank 1 cannot read its shard" in result.stderr
    assert "server.health_timeout_s" not in result.stderr  # found by the rank's exit, not after 900 s
    assert nothing_left(str(tmp_path)) == []


@pytest.mark.slow
def test_a_taken_port_fails_a_local_launch_before_submission(tmp_path):
    """Found on this machine before anything is submitted (a leader that still cannot bind, a race or on another
    node, fails its replica through its exit record like any rank that fails to start: the test above)."""
    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", "job.folder=jobs",
                                 f"server.port={port}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert f"server.port={port}: port {port} on this machine is taken" in result.stderr
    assert "submitted" not in result.stderr + result.stdout
    assert nothing_left(str(tmp_path)) == []


@pytest.mark.slow
def test_when_one_replica_fails_the_other_serves_on(tmp_path):
    serving = Serving(tmp_path, "tiny", "parallel.replicas=2", "parallel.tensor=2", "server.heartbeat_timeout_s=6")
    try:
        serving.rank_process(3).kill()  # replica 1's follower
        health = wait_for_failed_health(serving.urls[1], timeout=60)
        assert f"rank 3 on {socket.gethostname()} exited" in health["error"]
        reported, deadline = f"rank 2 on {socket.gethostname()}: replica 1 failed", time.monotonic() + 60
        while reported not in serving.stderr() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert reported in serving.stderr()  # the launcher tells, and serves on
        answer = requests.put(f"{serving.urls[0]}/generate", json={"sentences": ["Once upon"],
                                                                    "tokens_to_generate": 3, "greedy": True})
        assert answer.status_code == 200 and serving.proc.poll() is None
    finally:
        serving.stop()
    assert serving.exit_code(timeout=10) == 130
    assert nothing_left(str(tmp_path)) == []
