"""Two replicas on one machine: each serves on its own port; a rank that fails while loading fails the launch
at once with its error, instead of after server.health_timeout_s."""
import os
import socket
import subprocess
import sys

import pytest
import requests

from tests.job_faults import Serving, nothing_left

pytestmark = pytest.mark.slow

# Injected into every process of the job through PYTHONPATH: rank 3 (replica 1's follower) cannot load.
FAULTY_RANK = """
import os
if os.environ.get("SUBMITIT_LOCAL_GLOBALID") == "3":
    import fleetgen.model.load as load

    def build_generator(*args, **kwargs):
        raise RuntimeError("injected fault: rank 3 cannot read its shard")

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


def test_a_rank_that_fails_while_loading_fails_a_two_replica_launch_at_once(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULTY_RANK)
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}:{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", "parallel.replicas=2",
                             "parallel.tensor=2", "job.folder=jobs"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, **env})
    assert result.returncode == 2
    assert "a rank exited before the job was healthy" in result.stderr, result.stderr
    assert "injected fault: rank 3 cannot read its shard" in result.stderr
    assert "server.health_timeout_s" not in result.stderr  # found by the rank's exit, not after 900 s
    assert nothing_left(str(tmp_path)) == []
