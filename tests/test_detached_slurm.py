"""Detached batch jobs on the real local Slurm cluster: submitted, followed and steered from other shells."""
import json
import subprocess

import pytest

from fleetgen.launcher.jobrecord import read_history
from tests.detached_jobs import (LAUNCH, LONG_ITEMS, assert_every_item_once, final_status, kill_all, launch,
                                 processes_of, progress, sacct_state, squeue, status, submit, wait_for_progress,
                                 wait_for_slurm_end, wait_until, write_prompts)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    yield
    jobs = tmp_path / "jobs"
    ids = [p.name for p in jobs.iterdir() if p.name.isdigit()] if jobs.exists() else []
    left = [job_id for job_id in ids if squeue(job_id)]
    if left:
        subprocess.run(["scancel", *left], check=False)
    stray = processes_of(str(tmp_path))
    kill_all(stray)
    assert left == [], f"jobs left in the queue: {left}"
    assert stray == [], f"processes left: {[p.info['cmdline'] for p in stray]}"


def test_a_detached_run_finishes_by_itself(tmp_path):
    job_id = submit(tmp_path, "tiny_slurm")
    assert squeue(job_id)  # the launcher has exited; the job goes on without it
    wait_for_slurm_end(job_id)
    report = final_status(tmp_path, job_id)
    assert report["state"] == "COMPLETED" and report["complete"]
    assert report["done"] == report["total"] == 8 and report["failed"] == 0
    assert report["requeues"] == 0
    assert (tmp_path / "results.jsonl.summary.json").exists()
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 8
    driver_log = launch(tmp_path, "logs", job_id)
    assert "healthy" in driver_log.stdout
    rank_log = launch(tmp_path, "logs", job_id, "--rank", "3")
    assert "rank 3 (replica 0, tensor 1, stage 1)" in rank_log.stdout
    human = launch(tmp_path, "status")  # the latest job of job.folder
    assert f"job {job_id} (slurm, recipe tiny_slurm): COMPLETED" in human.stdout


@pytest.mark.timeout(1200)  # the time-limit case: a start of up to 2 minutes, then the rest in one start
@pytest.mark.parametrize("how", ["usr2", "time_limit"])
def test_a_warned_job_drains_requeues_and_resumes(tmp_path, how):
    # With a time limit, more work than a quiet machine does in the 50-80 s before the warning.
    count = 120 if how == "usr2" else 2000
    write_prompts(tmp_path / "in.jsonl", count)
    overrides = ["batch.input=in.jsonl", "job.grace_period_s=10", "batch.drain_timeout_s=10"]
    if how == "usr2":
        overrides.append(LONG_ITEMS)
    if how == "time_limit":  # USR2 40 s before the 2 min limit, Slurm looking every 30 s: 50-80 s into each start
        overrides += ["cluster.time_min=2", "batch.drain_timeout_s=30"]
    job_id = submit(tmp_path, "tiny_slurm", *overrides)
    if how == "usr2":
        wait_for_progress(tmp_path, 10)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    else:  # once the time limit has drained the first start, the rest gets one start (a loaded machine did
        # 200 items a start: ten starts, and a slower one would have run out of requeues)
        wait_until(lambda: drains(tmp_path, job_id), 600, "the time limit's first drain")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=20"], check=True)
    wait_for_slurm_end(job_id, timeout=1100)
    report = final_status(tmp_path, job_id)
    assert report["state"] == "COMPLETED", report
    assert report["requeues"] >= 1
    drained = [e for e in report["history"] if e["event"] == "drained"]
    assert drained and drained[0]["reason"] == ("preempted" if how == "usr2" else "timed-out")
    assert 0 < drained[0]["done"] < count  # drained mid-run, then resumed
    assert [e["attempt"] for e in report["history"] if e["event"] == "started"][:2] == [0, 1]
    assert_every_item_once(tmp_path, count)
    assert report["done"] == report["total"] == count


def drains(tmp_path, job_id) -> int:
    """How many times the job's driver has drained so far."""
    return sum(event["event"] == "drained" for event in read_history(tmp_path / "jobs" / job_id))


def test_launch_cancel_drains_and_cancels(tmp_path):
    write_prompts(tmp_path / "in.jsonl", 200)
    job_id = submit(tmp_path, "tiny_slurm", "batch.input=in.jsonl", LONG_ITEMS)
    wait_for_progress(tmp_path, 5)
    result = launch(tmp_path, "cancel", job_id)
    assert result.returncode == 0, result.stderr
    assert "drained" in result.stdout
    assert squeue(job_id) == ""
    assert sacct_state(job_id).startswith("CANCELLED")
    assert processes_of(str(tmp_path)) == []
    report = status(tmp_path, job_id)
    assert report["history"][-1]["event"] == "cancelled"
    done = progress(tmp_path)["done"]
    assert 0 < done < 200


def test_a_job_requeued_without_warning_resumes_from_the_ledger(tmp_path):
    """`scontrol requeue` kills the job without USR2: no drain, and still every item exactly once."""
    write_prompts(tmp_path / "in.jsonl", 120)
    job_id = submit(tmp_path, "tiny_slurm", "batch.input=in.jsonl", LONG_ITEMS)
    wait_for_progress(tmp_path, 10)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for_slurm_end(job_id)
    report = final_status(tmp_path, job_id)
    assert report["state"] == "COMPLETED", report
    assert report["requeues"] == 1
    assert [e["event"] for e in report["history"]] == ["started", "started", "finished"]
    assert_every_item_once(tmp_path, 120)


def test_a_second_batch_on_a_jobs_output_is_refused_until_the_job_is_scancelled_then_takes_it_over(tmp_path):
    count = 24
    write_prompts(tmp_path / "in.jsonl", count)
    overrides = ["batch.input=in.jsonl", LONG_ITEMS]
    second = [*LAUNCH, "tiny_slurm", "job.folder=jobs", *overrides]  # the same batch.output, results.jsonl
    job_id = submit(tmp_path, "tiny_slurm", *overrides)
    # queued or starting: no process of the job holds the lock yet, its launcher's note names it; then running
    for when in ("just submitted", "running"):
        if when == "running":
            wait_for_progress(tmp_path, 3)
        refused = subprocess.run(second, cwd=tmp_path, capture_output=True, text=True, timeout=5)  # at once
        assert refused.returncode == 2, (when, refused.stderr)
        assert f"is being written by another run (job {job_id} (slurm, detached)" in refused.stderr or \
            f"is being written by job {job_id} (slurm, detached)" in refused.stderr, (when, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert squeue(job_id)  # refusing did not touch the job
    subprocess.run(["scancel", job_id], check=True)
    wait_for_slurm_end(job_id)
    assert sacct_state(job_id).startswith("CANCELLED")
    taken_over = subprocess.run(second, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert taken_over.returncode == 0, taken_over.stderr
    summary = json.loads((tmp_path / "results.jsonl.summary.json").read_text())
    assert summary["complete"] and summary["audit"]["ok"], summary
    assert 0 < sum(server["done"] for server in summary["servers"]) < count  # resumed from the job's ledger
    assert_every_item_once(tmp_path, count)
