"""Hung and dead ranks on the real local Slurm cluster (tiny_slurm: 2 nodes, tensor 2 × pipeline 2): the
replica fails naming the rank and its node, the request gets 503, the job leaves the queue, the launcher
exits non-zero with the reason, and no process is left."""
import signal
import subprocess

import pytest

from tests.job_faults import Serving, continue_or_kill, nothing_left
from tests.test_liveness import MARGIN_S, assert_replica_failed, start_long_request

pytestmark = pytest.mark.slow

OVERRIDES = ["server.heartbeat_timeout_s=6", "job.name=fleetgen-health"]


def in_queue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("rank, node, busy", [(1, "node1", False), (3, "node2", True)],
                         ids=["tensor-follower-idle", "pipeline-stage-mid-request"])
def test_a_stopped_rank_fails_the_slurm_job(tmp_path, rank, node, busy):
    serving = Serving(tmp_path, "tiny_slurm", *OVERRIDES)
    stopped = serving.rank_process(rank)
    try:
        answer = start_long_request(serving.urls[0]) if busy else None
        stopped.send_signal(signal.SIGSTOP)
        assert_replica_failed(serving, answer, f"rank {rank} on {node} sent no heartbeat", 6 + MARGIN_S)
        assert in_queue(serving.job_id) == ""
    finally:
        continue_or_kill(stopped)
        serving.stop()
        subprocess.run(["scancel", serving.job_id], check=False)
    assert nothing_left(str(tmp_path)) == []


def test_a_killed_rank_fails_the_slurm_job_mid_request(tmp_path):
    serving = Serving(tmp_path, "tiny_slurm", *OVERRIDES)
    try:
        answer = start_long_request(serving.urls[0])
        serving.rank_process(2).kill()
        assert_replica_failed(serving, answer, "rank 2 on node2 exited", MARGIN_S)
        assert in_queue(serving.job_id) == ""
    finally:
        serving.stop()
        subprocess.run(["scancel", serving.job_id], check=False)
    assert nothing_left(str(tmp_path)) == []
