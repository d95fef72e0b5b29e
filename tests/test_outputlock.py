"""One run per batch.output: the lock is re-entrant within a process, refuses another naming the holder, and
is free again once released."""
import os
import subprocess
import sys

from fleetgen.launcher.batch.outputlock import lock_output

TAKE = "import pathlib, sys; from fleetgen.launcher.batch.outputlock import lock_output; " \
       "lock_output(pathlib.Path(sys.argv[1]))"


def test_a_second_process_is_refused_naming_the_first_until_the_first_releases(tmp_path):
    output = tmp_path / "out.jsonl"
    lock = lock_output(output)
    again = lock_output(output)  # batch.run() inside a launcher that holds it already
    again.release()
    lock.note(job_id="42")
    other = subprocess.run([sys.executable, "-c", TAKE, str(output)], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "is being written by another run (job 42, launch pid " in other.stderr
    lock.release()
    other = subprocess.run([sys.executable, "-c", TAKE, str(output)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr


def test_a_queued_detached_job_keeps_its_output_until_its_scheduler_says_it_ended(tmp_path):
    """A detached job's launcher notes the job and exits: no process holds the flock while the job is queued.
    Here the job is a local one, whose id is its controller's pid (a sleeping process stands in for it)."""
    from fleetgen.launcher.job import job_ref

    output = tmp_path / "out.jsonl"
    controller = subprocess.Popen(["sleep", "600"])
    try:
        job = job_ref("local", str(controller.pid))
        with lock_output(output) as lock:  # the job's launcher, exiting after the submission
            lock.note_job(job)
        other = subprocess.run([sys.executable, "-c", TAKE, str(output)], capture_output=True, text=True,
                               timeout=60)
        assert other.returncode != 0
        assert f"is being written by job {controller.pid} (local, detached), since " in other.stderr
        assert f"launch cancel {controller.pid}" in other.stderr
        lock_output(output, job=job).release()  # the job's own driver takes it, and names the job in it
        other = subprocess.run([sys.executable, "-c", TAKE, str(output)], capture_output=True, text=True,
                               timeout=60)
        assert other.returncode != 0 and f"job {controller.pid} (local, detached)" in other.stderr
    finally:
        controller.kill()
        controller.wait()
    other = subprocess.run([sys.executable, "-c", TAKE, str(output)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr  # the job has ended: its output is free


def test_a_detached_job_whose_scheduler_cannot_be_asked_keeps_its_output_and_says_how_to_free_it(tmp_path):
    output = tmp_path / "out.jsonl"
    with lock_output(output) as lock:
        lock.note_job({"kind": "slurm", "job_id": "42", "job_started": None})
    no_slurm = {**os.environ, "PATH": str(tmp_path)}  # squeue and sacct are nowhere on it
    other = subprocess.run([sys.executable, "-c", TAKE, str(output)], capture_output=True, text=True, timeout=60,
                           env=no_slurm)
    assert other.returncode != 0 and "FileNotFoundError" not in other.stderr
    assert "was last written by job 42 (slurm, detached), since " in other.stderr
    assert f"once it has ended, remove {output}.lock" in other.stderr
