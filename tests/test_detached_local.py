"""Detached batch jobs on submitit's local executor (cluster=local): the job outlives `launch`, status and
cancel find it from its folder alone."""
import pytest

from tests.detached_jobs import (assert_every_item_once, kill_all, launch, processes_of, progress, status, submit,
                                 wait_for_progress, wait_until, write_prompts)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    yield
    stray = processes_of(str(tmp_path))
    kill_all(stray)
    assert stray == [], f"processes left: {[p.info['cmdline'] for p in stray]}"


def ended(tmp_path, job_id):
    report = status(tmp_path, job_id)
    return report if report["state"] != "RUNNING" else None


def test_a_local_detached_run_finishes_by_itself(tmp_path):
    write_prompts(tmp_path / "in.jsonl", 24)
    job_id = submit(tmp_path, "tiny", "batch.input=in.jsonl")
    assert status(tmp_path, job_id)["state"] == "RUNNING"  # `launch` has returned; its job has not
    follow = launch(tmp_path, "logs", job_id, "-f", timeout=120)  # returns once the job has ended
    assert "healthy" in follow.stdout and "results: " in follow.stdout
    report = wait_until(lambda: ended(tmp_path, job_id), 30, "the job to end")
    assert report["state"] == "COMPLETED" and report["complete"]
    assert report["done"] == report["total"] == 24
    assert_every_item_once(tmp_path, 24)


def test_launch_cancel_drains_a_local_job(tmp_path):
    write_prompts(tmp_path / "in.jsonl", 400)
    job_id = submit(tmp_path, "tiny", "batch.input=in.jsonl", "batch.concurrency=1", "batch.prompts_per_request=1")
    wait_for_progress(tmp_path, 5, timeout=120)
    result = launch(tmp_path, "cancel", job_id)
    assert result.returncode == 0, result.stderr
    assert "drained" in result.stdout and "state CANCELLED" in result.stdout
    assert processes_of(str(tmp_path)) == []
    assert 0 < progress(tmp_path)["done"] < 400
    again = launch(tmp_path, "cancel", job_id)
    assert "has already ended: CANCELLED" in again.stdout
