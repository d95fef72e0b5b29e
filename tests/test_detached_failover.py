"""Two replicas of a detached job on the local Slurm cluster (one per node, tensor 2 each): a lost replica's
items go to the other, a slow replica gets fewer."""
import json
import signal
import subprocess
import threading
import time

import psutil
import pytest

from tests.detached_jobs import (LONG_ITEMS, assert_every_item_once, final_status, kill_all, processes_of, progress,
                                 rank_process, squeue, submit, wait_for_progress, wait_for_slurm_end, wait_until,
                                 write_prompts)

pytestmark = pytest.mark.slow

TWO_REPLICAS = ["parallel.replicas=2", "parallel.tensor=2", "parallel.pipeline=1", "batch.input=in.jsonl",
                "server.heartbeat_timeout_s=6", "server.step_timeout_s=20"]


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


def replica_url(tmp_path, job_id, replica):
    return json.loads((tmp_path / "jobs" / job_id / f"server-{replica}.json").read_text())["url"]


@pytest.mark.parametrize("victim, replica, sig", [(0, 0, signal.SIGKILL), (3, 1, signal.SIGSTOP)],
                         ids=["sigkill-leader-of-replica-0", "sigstop-follower-of-replica-1"])
def test_a_lost_replica_fails_over(tmp_path, victim, replica, sig):
    count = 160
    write_prompts(tmp_path / "in.jsonl", count)
    job_id = submit(tmp_path, "tiny_slurm", *TWO_REPLICAS, LONG_ITEMS)
    wait_for_progress(tmp_path, 20)
    process = rank_process(job_id, victim)
    process.send_signal(sig)
    lost = replica_url(tmp_path, job_id, replica)
    if sig == signal.SIGSTOP:  # the replica fails on the heartbeat; then the stopped rank may see it and go
        wait_until(lambda: any(r["url"] == lost and r["state"] == "failed"
                               for r in progress(tmp_path).get("replicas", [])), 120, f"{lost} failed")
        process.resume()
    wait_for_slurm_end(job_id)
    report = final_status(tmp_path, job_id)
    assert report["state"] == "COMPLETED", report
    assert_every_item_once(tmp_path, count)
    summary = json.loads((tmp_path / "results.jsonl.summary.json").read_text())
    assert summary["complete"] and summary["audit"]["ok"]
    assert [r["url"] for r in summary["lost_replicas"]] == [lost]
    assert [r["url"] for r in report["lost_replicas"]] == [lost]
    survivor = replica_url(tmp_path, job_id, 1 - replica)
    assert [r["url"] for r in summary["servers"] if r["state"] == "healthy"] == [survivor]


def test_a_slow_replica_gets_fewer_items(tmp_path):
    """Replica 1's follower runs a quarter of the time (SIGSTOP/SIGCONT, well inside the heartbeat timeout)."""
    count = 120
    write_prompts(tmp_path / "in.jsonl", count)
    job_id = submit(tmp_path, "tiny_slurm", *TWO_REPLICAS, "batch.concurrency=2", "batch.prompts_per_request=1")
    wait_until(lambda: progress(tmp_path).get("replicas"), 180, "the batch to start")
    slowed = rank_process(job_id, 3)
    stop = threading.Event()

    def throttle():
        try:
            while not stop.is_set():
                slowed.suspend()
                time.sleep(0.3)
                slowed.resume()
                time.sleep(0.1)
        except psutil.NoSuchProcess:
            pass  # the job has ended

    thread = threading.Thread(target=throttle, daemon=True)
    thread.start()
    try:
        wait_for_slurm_end(job_id)
    finally:
        stop.set()
        thread.join()
    assert_every_item_once(tmp_path, count)
    summary = json.loads((tmp_path / "results.jsonl.summary.json").read_text())
    done = {server["url"]: server["done"] for server in summary["servers"]}
    fast, slow = done[replica_url(tmp_path, job_id, 0)], done[replica_url(tmp_path, job_id, 1)]
    assert summary["lost_replicas"] == []
    assert slow < 0.6 * fast, done  # round-robin would split them evenly
