"""The job's control token: a random secret only the job's owner can read, that stops (and in batch mode uses)
the job's servers. The launcher writes it into the job folder at submission; the replicas' leaders read it."""
from __future__ import annotations

import secrets
import time
from pathlib import Path

from fleetgen.slurm.job_folder import JobPaths, write_atomically

POLL_S = 0.1


def write_token(job_folder: Path) -> str:
    """A new token in job_folder/control-token (0600; the folder made 0700). Written once: a requeued job
    keeps its token."""
    job_folder.mkdir(parents=True, exist_ok=True)
    job_folder.chmod(0o700)
    token = secrets.token_urlsafe(32)
    write_atomically(JobPaths(job_folder).control_token, token, mode=0o600)  # never readable by others
    return token


def read_token(job_folder: Path, timeout_s: float) -> str:
    """The job's token; a rank may start before the launcher has written it."""
    path = JobPaths(job_folder).control_token
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not written within {timeout_s:g} s (server.health_timeout_s)")
        time.sleep(POLL_S)
    return path.read_text().strip()
