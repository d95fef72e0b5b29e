"""Job control per cluster kind, on submitit's local executor and on the real local Slurm cluster: queue
state, the ranks' exits while the job runs on, cancelling, and reaping a job a crashed launcher left."""
import os
import subprocess
import sys
import time

import pytest
import submitit

from fleetgen.launcher.config import parse_config as parse
from fleetgen.slurm.job_control import JobControl, LocalJobControl, SlurmJobControl
from fleetgen.slurm.rank_exit import write_exit

pytestmark = pytest.mark.slow

CLUSTERS = {
    "local": ({"kind": "local", "gpus_per_node": 0}, {"tensor": 2}),
    "slurm": ({"kind": "slurm", "partition": "debug", "gpus_per_node": 0, "tasks_per_node": 1, "time_min": 5},
              {"nodes": 2, "tensor": 2}),
}


def config(kind: str, folder):
    cluster, parallel = CLUSTERS[kind]
    return parse({"recipe": "job-control-test", "cluster": cluster, "model": {"checkpoint": "unused"},
                  "parallel": parallel, "job": {"folder": str(folder), "name": "fleetgen-health-test"}})


def rank_one_exits(folder: str, with_a_word: bool) -> None:
    """Rank 1 leaves (saying why, or killed without a word); rank 0 runs until cancelled."""
    env = submitit.JobEnvironment()
    if env.global_rank == 1:
        if with_a_word:
            write_exit(os.path.join(folder, str(env.job_id)), 1, "somewhere", "it had enough")
        os._exit(3)
    time.sleep(600)


def until(predicate, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not true within {timeout_s} s: {predicate}")


@pytest.mark.parametrize("kind", ["local", "slurm"])
def test_a_ranks_exit_is_seen_while_the_job_runs_and_cancel_ends_it(tmp_path, kind):
    control = JobControl.submit(config(kind, tmp_path), tmp_path, rank_one_exits, str(tmp_path), True)
    try:
        assert isinstance(control, {"local": LocalJobControl, "slurm": SlurmJobControl}[kind])
        assert control.folder == tmp_path / control.job_id
        until(lambda: control.queue_state() == "running")
        assert until(control.rank_exits) == {1: "on somewhere: it had enough"}
        assert not control.ended() and not control.gone()
    finally:
        control.cancel()
    until(control.gone)
    until(control.ended)  # sacct may record the end a moment after the queue forgets the job
    if kind == "slurm":
        assert control.final_state().startswith("CANCELLED")


def test_a_local_rank_killed_without_a_word_is_seen(tmp_path):
    control = JobControl.submit(config("local", tmp_path), tmp_path, rank_one_exits, str(tmp_path), False)
    try:
        assert until(control.rank_exits) == {1: "exited without a word (killed?)"}
    finally:
        control.cancel()
    until(control.gone)


@pytest.mark.parametrize("kind", ["local", "slurm"])
def test_reap_ends_a_job_left_running(tmp_path, kind, capsys):
    control = JobControl.submit(config(kind, tmp_path), tmp_path, rank_one_exits, str(tmp_path), True)
    try:
        until(lambda: control.queue_state() == "running")
        type(control).reap(control.job_id)
        until(control.gone)
        assert "left running by a launcher that crashed" in capsys.readouterr().err
    finally:
        control.cancel()


def test_a_local_job_runs_while_any_rank_outlives_its_controller():
    """submitit's controller SIGKILLs its ranks last and exits without waiting: until the ranks are gone the
    job has not ended, or `launch cancel` and Ctrl-C would report a teardown with processes still there."""
    job_id = "999999999"  # no controller of that pid: it has exited
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "SUBMITIT_LOCAL_JOB_ID": job_id})
    try:
        assert LocalJobControl.state_of(job_id) == "RUNNING"
    finally:
        rank.kill()
        rank.wait()
    assert LocalJobControl.state_of(job_id) is None
