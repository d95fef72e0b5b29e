"""`launch` against the real Slurm cluster that slurm/local_cluster.sh started: nothing here pretends."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed import our_processes

pytestmark = pytest.mark.slow


def squeue(job_id):
    return subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()


def our_jobs():
    return subprocess.run(["squeue", "-h", "-n", "fleetgen", "-o", "%i"], capture_output=True,
                          text=True).stdout.split()


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    yield
    deadline = time.monotonic() + 60
    while (our_jobs() or our_processes(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(1)
    left = our_jobs()
    if left:
        subprocess.run(["scancel", *left], check=False)
    assert left == [], f"jobs left in the queue: {left}"
    assert our_processes(str(tmp_path)) == []


def launch(tmp_path, *overrides, timeout=600):
    return subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny_slurm", "job.folder=jobs",
                           *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def start_serving(tmp_path, *overrides):
    """A launcher in serve mode, once it printed its URL; returns the process and the Slurm job id."""
    proc = subprocess.Popen([sys.executable, "-m", "fleetgen.launcher", "tiny_slurm", "mode=serve",
                             "job.folder=jobs", *overrides], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving"), (line, proc.stderr.read() if proc.poll() is not None else "")
    job_id = (tmp_path / "jobs" / "latest").read_text().strip()
    assert squeue(job_id)
    return proc, job_id


def test_two_nodes_tensor2_pipeline2_serve_a_batch(tmp_path):
    result = launch(tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["completion_tokens"] > 0 for r in records)
    job_folder = next((tmp_path / "jobs").glob("[0-9]*"))
    logs = " ".join(p.read_text() for p in job_folder.glob("*_log.out"))
    assert "node1" in logs and "node2" in logs  # the ranks really ran on both nodes


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_cancels_the_job(tmp_path, sig):
    proc, job_id = start_serving(tmp_path)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130
    assert squeue(job_id) == ""


def test_scancel_from_outside_is_reported(tmp_path):
    proc, job_id = start_serving(tmp_path)
    subprocess.run(["scancel", job_id], check=True)
    assert proc.wait(timeout=120) == 2
    stderr = proc.stderr.read()
    assert f"job {job_id} ended while serving" in stderr and "CANCELLED" in stderr


def test_a_job_that_fails_while_loading_shows_its_error(tmp_path):
    # Validation passes on the login node; every rank then fails to allocate its KV cache.
    result = launch(tmp_path, "model.max_batch=100000000")
    assert result.returncode == 2
    # At once, from whichever the launcher sees first: a rank's exit record, its replica's /health or the job's end.
    assert re.search(r"(a rank exited|a replica failed|ended) before (the job|it|its server) was healthy",
                     result.stderr)
    assert "allocate" in result.stderr.lower()  # the rank's own error, from its stderr


def test_a_job_stuck_pending_is_cancelled_after_the_health_timeout(tmp_path):
    blocker = subprocess.run(["sbatch", "--parsable", "-N2", "--exclusive", "-J", "blocker", "-p", "debug",
                              "-o", "/dev/null", "--wrap", "sleep 300"], capture_output=True, text=True,
                             check=True).stdout.strip()
    try:
        result = launch(tmp_path, "server.health_timeout_s=15", timeout=180)
    finally:
        subprocess.run(["scancel", blocker], check=False)
    assert result.returncode == 2
    assert "PENDING" in result.stderr and "reason" in result.stderr
    assert "was not healthy after 15 s" in result.stderr


def test_a_crashed_launchers_job_is_cancelled_by_the_next_launch(tmp_path):
    proc, job_id = start_serving(tmp_path)
    proc.kill()  # SIGKILL: no teardown ran
    proc.wait()
    assert squeue(job_id)
    result = launch(tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"cancelled job {job_id}, left running by a launcher that crashed" in result.stderr
    assert squeue(job_id) == ""
