"""One run per batch.output: the lock is re-entrant within a process, refuses another naming the holder, and
is free again once released."""
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
