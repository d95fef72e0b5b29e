"""One run writes a batch.output at a time: an flock on OUTPUT.lock, held while the run lives (the kernel
drops it when the process ends, however it ends). The holder writes who it is into the file, so that a second
run is refused at once, naming the first. Re-entrant within a process: the launcher takes it before submission
and batch.run() takes it again around the run itself.

A detached job writes its output with no process of it alive while it waits in the queue: its launcher notes
the job in the file (note_job) and exits, and the job's driver takes the lock when the job starts. A run that
finds the lock free but the file naming another detached job is refused as long as the job's scheduler says
it is queued or running; once it has ended (finished, cancelled, failed), the output is free."""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from fleetgen.launcher import owner
from fleetgen.launcher.errors import LaunchError

_held: dict[Path, OutputLock] = {}  # this process's locks, by lock file


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    def __init__(self, path: Path, fd: int):
        self.path, self._fd, self._takers = path, fd, 1
        self._about = {**owner.identity(), "since": time.time()}
        self._write()

    def note(self, **fields) -> None:
        """Add to what a refused run is told about this one (e.g. the job id once submitted)."""
        self._about.update(fields)
        self._write()

    def note_job(self, ref: dict) -> None:
        """The detached job (launcher/job.py job_ref) that writes this output, before and after this process."""
        self.note(**ref, detached=True)

    def _write(self) -> None:
        data = json.dumps(self._about).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        self._takers -= 1
        if self._takers == 0:
            _held.pop(self.path, None)
            os.close(self._fd)  # the flock goes with it; the file stays (unlinking a locked file races)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(output: Path, job: dict | None = None) -> OutputLock:
    """Take OUTPUT's lock, or raise LaunchError naming the run that holds it. job: the detached job this process
    runs (its driver), which takes over its own output (its launcher's note, or its earlier start's)."""
    path = lock_path(Path(output))
    if path in _held:
        _held[path]._takers += 1
        return _held[path]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise LaunchError(f"batch.output={output}: cannot create its lock file {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise LaunchError(f"batch.output={output} is being written by another run ({holder}); wait until it "
                          "ends, or give another batch.output") from None
    except OSError as e:  # a file system without locks (some NFS mounts)
        os.close(fd)
        raise LaunchError(f"batch.output={output}: cannot lock {path} ({e.strerror}); put the output on a file "
                          "system that supports flock") from None
    earlier = _about(fd)
    if earlier.get("detached") and earlier.get("job_id") != (job or {}).get("job_id"):
        try:
            runs = _runs(earlier)
        except OSError as e:  # no scheduler here (squeue missing): the job may run elsewhere
            os.close(fd)
            raise LaunchError(f"batch.output={output} was last written by {_describe(earlier)}, whose state "
                              f"cannot be asked here ({e}); once it has ended, remove {path}") from None
        if runs:
            os.close(fd)
            raise LaunchError(f"batch.output={output} is being written by {_describe(earlier)}; wait until it "
                              f"ends, cancel it (launch cancel {earlier['job_id']}), or give another batch.output")
    _held[path] = OutputLock(path, fd)
    if job is not None:
        _held[path].note_job(job)
    return _held[path]


def _runs(job: dict) -> bool:
    from fleetgen.launcher.job import still_runs  # not at the top: launcher/job.py imports launcher/batch/

    return still_runs(job)


def _about(fd: int) -> dict:
    """What the lock file says of its last holder ({} if nothing yet)."""
    try:
        about = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return {}
    return about if isinstance(about, dict) else {}


def _holder(fd: int) -> str:
    about = _about(fd)
    return _describe(about) if about else "which has not said who it is yet"


def _describe(about: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(about["since"]))
    if about.get("detached"):  # its launcher has exited; its driver runs in the job, wherever that is
        return f"job {about['job_id']} ({about['kind']}, detached), since {since}"
    job = f"job {about['job_id']}, " if about.get("job_id") else ""
    return f"{job}launch {owner.describe(about)}, since {since}"
