"""slurm/local_cluster.sh, against the cluster it started (CI runs `slurm/local_cluster.sh up` first).

`down` is not exercised here: other tests, and other engineers on this machine, need the cluster up.
"""
import re
import subprocess
import time
from pathlib import Path

import pytest

import fleetgen.slurm

pytestmark = pytest.mark.slow

SCRIPT = Path(fleetgen.slurm.__path__[0]) / "local_cluster.sh"


def cluster(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def node_state(node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True).stdout.strip()


def test_up_again_is_fast_and_harmless():
    started = time.monotonic()
    result = cluster("up")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 15
    assert re.fullmatch(r"local slurm cluster up: 2 nodes node\[1-2\] .* partition debug; "
                        r"node1=(idle|mix|alloc) node2=(idle|mix|alloc)\n", result.stdout)


def test_nodes_declare_8_cpus_and_2_fake_gpus():
    for node in ("node1", "node2"):
        info = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                              check=True).stdout
        assert "CPUTot=8" in info and "Gres=gpu:2" in info and "Partitions=debug" in info
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P %l"], capture_output=True, text=True).stdout.split()
    assert partitions == ["debug*", "infinite"]  # the default partition, no time limit


def test_status_shows_nodes_and_queue():
    result = cluster("status")
    assert result.returncode == 0, result.stderr
    assert "debug*" in result.stdout and "node[1-2]" in result.stdout and "JOBID" in result.stdout


def test_up_resumes_a_drained_node():
    subprocess.run(["scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=fleetgen-test"], check=True)
    try:
        assert node_state("node2") in ("drain", "drng")  # drng: still running a job
        result = cluster("up")
        assert result.returncode == 0, result.stderr
        assert "resuming node2" in result.stderr
        assert node_state("node2") in ("idle", "mix", "alloc")
    finally:
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], capture_output=True)


def test_accounting_records_finished_jobs():
    job_id = subprocess.run(["srun", "-p", "debug", "-N2", "-n2", "printenv", "SLURM_JOB_ID"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.split()[0]
    deadline = time.monotonic() + 30
    state = ""
    # slurmctld reports to slurmdbd in the background: the record appears a moment after the job ends.
    while time.monotonic() < deadline and state != "COMPLETED":
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                               text=True).stdout.strip()
        time.sleep(0.5)
    assert state == "COMPLETED"


def test_bad_arguments_are_refused_with_a_message():
    result = cluster("up", "zero")
    assert result.returncode == 1 and "NODES must be a positive integer, got 'zero'" in result.stderr
    result = cluster("restart")
    assert result.returncode == 2 and "usage:" in result.stderr
