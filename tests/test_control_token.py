"""The job's control token: owner-only on disk, needed for /shutdown always and for every request but /health
in batch mode; serve mode keeps the model cards' clients working; the token never shows in logs or output."""
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import requests

from fleetgen.slurm.control_token import read_token, write_token
from tests import server_fixtures
from tests.job_faults import Serving, nothing_left
from tests.server_fixtures import serving

checkpoint = server_fixtures.checkpoint
TOKEN = "t0ken-of-the-owner"
BODY = {"sentences": ["Once upon"], "tokens_to_generate": 2, "greedy": True}


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_the_token_file_is_owner_only_even_under_a_permissive_umask(tmp_path):
    previous = os.umask(0)
    try:
        token = write_token(tmp_path / "jobs" / "42")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "jobs" / "42" / "control-token").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "jobs" / "42").stat().st_mode) == 0o700
    assert len(token) >= 40 and read_token(tmp_path / "jobs" / "42", timeout_s=1) == token
    assert write_token(tmp_path / "jobs" / "43") != token


def test_a_rank_waits_for_the_token_then_gives_up_naming_the_file(tmp_path):
    with pytest.raises(TimeoutError, match="control-token was not written within 0.3 s"):
        read_token(tmp_path, timeout_s=0.3)


def test_serve_mode_keeps_generation_open_and_shutdown_needs_the_token(checkpoint):
    with serving(checkpoint, control_token=TOKEN) as served:
        assert requests.put(f"{served.url}/generate", json=BODY).status_code == 200  # the model cards' request
        assert requests.put(served.url).status_code == 200  # the `curl -X PUT` wait loop
        for headers in ({}, bearer("nope")):
            refused = requests.post(f"{served.url}/shutdown", headers=headers)
            assert refused.status_code == 401 and "control token" in refused.json()["error"]
        assert served.server.status()[0] == 200 and served.server.status()[1]["status"] == "ready"
        assert requests.post(f"{served.url}/shutdown", headers=bearer(TOKEN)).json() == {"status": "stopping"}


def test_an_api_key_closes_generation_but_never_opens_shutdown(checkpoint):
    with serving(checkpoint, api_key="s3cret", control_token=TOKEN) as served:
        assert requests.put(f"{served.url}/generate", json=BODY).status_code == 401
        assert requests.put(f"{served.url}/generate", json=BODY, headers=bearer("s3cret")).status_code == 200
        assert requests.put(f"{served.url}/generate", json=BODY, headers=bearer(TOKEN)).status_code == 200
        assert requests.post(f"{served.url}/shutdown", headers=bearer("s3cret")).status_code == 401


def test_batch_mode_needs_the_token_everywhere_but_health(checkpoint):
    with serving(checkpoint, control_token=TOKEN, private=True) as served:
        url = served.url
        assert requests.get(f"{url}/health").status_code == 200 and requests.put(url).status_code == 200
        assert requests.put(f"{url}/generate", json=BODY).status_code == 401
        assert requests.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"}).status_code == 401
        assert requests.get(f"{url}/v1/models").status_code == 401
        assert requests.post(f"{url}/shutdown").status_code == 401
        assert requests.put(f"{url}/generate", json=BODY, headers=bearer(TOKEN)).status_code == 200
        assert requests.get(f"{url}/v1/models", headers=bearer(TOKEN)).status_code == 200


def test_a_failed_replica_answers_everything_503_with_the_reason(checkpoint):
    with serving(checkpoint, max_batch=1, control_token=TOKEN) as served:
        started, step = threading.Event(), served.engine.generator.launch
        served.engine.generator.launch = lambda plan, feed=None: started.set() or time.sleep(0.05) or step(plan, feed)
        answers = []
        requests_ = [threading.Thread(target=lambda: answers.append(requests.put(
            f"{served.url}/generate", json={**BODY, "tokens_to_generate": 100}, timeout=60))) for _ in range(3)]
        for thread in requests_:
            thread.start()
        assert started.wait(30)
        served.server.fail("rank 1 on node7 sent no heartbeat for 30 s")
        for thread in requests_:  # the running one and the two queued behind it (one slot)
            thread.join(60)
        assert [a.status_code for a in answers] == [503] * 3
        assert all("rank 1 on node7" in a.json()["error"] for a in answers)
        assert requests.get(f"{served.url}/health").json() == {"status": "failed",
                                                               "error": "rank 1 on node7 sent no heartbeat for 30 s"}
        assert "rank 1 on node7" in requests.put(f"{served.url}/generate", json=BODY).json()["error"]
        assert requests.post(f"{served.url}/shutdown", headers=bearer(TOKEN)).status_code == 503


@pytest.mark.slow
def test_a_served_job_stops_only_for_its_owner(tmp_path):
    serving_job = Serving(tmp_path, "tiny")
    try:
        url, folder = serving_job.urls[0], serving_job.job_folder
        assert stat.S_IMODE((folder / "control-token").stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
        wait_loop = subprocess.run(["curl", "-s", "-X", "PUT", url], capture_output=True, text=True)
        assert json.loads(wait_loop.stdout)["status"] == "ready"
        assert requests.post(f"{url}/shutdown").status_code == 401
        assert requests.post(f"{url}/shutdown", headers=bearer("guess")).status_code == 401
        time.sleep(2)
        assert requests.put(f"{url}/generate", json=BODY).status_code == 200  # still serving
        assert requests.post(f"{url}/shutdown", headers=bearer(serving_job.token())).status_code == 200
        assert serving_job.exit_code(timeout=120) == 2  # the launcher reports a job that ended by itself
        assert f"job {serving_job.job_id} ended while serving" in serving_job.stderr()
        token = serving_job.token()
    finally:
        serving_job.stop()
    assert nothing_left(str(tmp_path)) == []
    assert_nowhere(token, serving_job.stderr(), tmp_path)


@pytest.mark.slow
def test_batch_mode_sends_the_token_and_shows_it_nowhere(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", "job.folder=jobs"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 8
    token = next((tmp_path / "jobs").glob("*/control-token")).read_text()
    assert_nowhere(token, result.stdout + result.stderr, tmp_path)
    dry = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", "job.folder=jobs", "--dry-run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "control" not in dry.stdout.lower() and token not in dry.stdout


def assert_nowhere(token: str, output: str, tmp_path):
    assert token not in output
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "control-token":
            assert token.encode() not in path.read_bytes(), path
