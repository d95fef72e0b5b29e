"""A job's record and history in its folder, so that `launch status|logs|cancel` work from any shell, any time;
the folder's files are named in slurm/job_folder.py. job.json holds the job id, cluster kind, recipe, mode, output
and grace period; for a job a launcher attends, its owner (host, pid, pid start time), so that another launcher
reaps the job only once that owner is gone; and "ended" once it was torn down.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fleetgen.launcher.errors import LaunchError
from fleetgen.slurm.job_folder import HISTORY, LATEST, RECORD, JobPaths, write_atomically


def server_urls(job_folder: Path, replicas: int) -> list[str]:
    """The URLs of the replicas whose leaders have published one so far."""
    paths = (JobPaths(job_folder).server(replica) for replica in range(replicas))
    return [json.loads(path.read_text())["url"] for path in paths if path.exists()]


def write_record(folder: Path, job_folder: Path, record: dict) -> None:
    job_folder.mkdir(parents=True, exist_ok=True)
    write_atomically(job_folder / RECORD, json.dumps(record, indent=1))
    write_atomically(folder / LATEST, record["job_id"])


def mark_ended(job_folder: Path) -> None:
    record = read_record(job_folder)
    write_atomically(job_folder / RECORD, json.dumps({**record, "ended": True}, indent=1))


def find_job(job: str | None, folder: Path) -> Path:
    """A job's folder from a job id, a job folder, or nothing (the latest job submitted from `folder`)."""
    if job is None:
        latest = folder / LATEST
        if not latest.exists():
            raise LaunchError(f"no job was submitted with job.folder={folder}; give a job id or folder")
        job = latest.read_text().strip()
    candidates = [Path(job), folder / job]
    for candidate in candidates:
        if (candidate / RECORD).is_file():
            return candidate.resolve()
    raise LaunchError(f"{job}: not a job's id or folder (looked for {RECORD} in "
                      f"{' and '.join(str(c) for c in candidates)}); --folder names job.folder")


def read_record(job_folder: Path) -> dict:
    return json.loads((job_folder / RECORD).read_text())


def append_event(job_folder: Path, event: str, **fields) -> None:
    """One JSON line per event, flushed and synced: a requeue or a kill follows right after."""
    line = json.dumps({"event": event, "time": time.time(), **fields})
    with open(job_folder / HISTORY, "a") as out:
        out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())


def read_history(job_folder: Path) -> list[dict]:
    path = job_folder / HISTORY
    if not path.exists():
        return []
    events = []
    for text in path.read_text().splitlines():
        try:
            events.append(json.loads(text))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: the events before it stand
    return events
