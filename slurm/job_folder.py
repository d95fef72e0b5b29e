"""Every file of a job folder, by name, and the one atomic write. The launcher, the ranks and `launch
status|logs|cancel` all find a job's files here (like submitit's JobPaths).

job.folder/latest                 the id of the last job submitted with this job.folder
job.folder/ID/job.json            what was submitted, and the launcher that attends it (launcher/jobrecord.py)
job.folder/ID/history.jsonl       a detached job's events: started, drained, finished, ...
job.folder/ID/driver.log          a detached job's batch driver's output
job.folder/ID/cancel.request      `launch cancel` asks a detached job's driver to drain and cancel
job.folder/ID/control-token       the job's secret (0600): POST /shutdown, and every batch request
job.folder/ID/server-R.json       replica R's URL, written by its leader once it listens
job.folder/ID/rank-N.exit.json    rank N's last word: why it exited (null when normally)
job.folder/ID/rendezvous-ID.json  rank 0's torch.distributed init_method
job.folder/ID/ID_N_log.out|err    rank N's stdout and stderr (submitit's)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LATEST = "latest"
RECORD = "job.json"
HISTORY = "history.jsonl"
DRIVER_LOG = "driver.log"
CANCEL_REQUEST = "cancel.request"
TOKEN_FILE = "control-token"


@dataclass(frozen=True)
class JobPaths:
    folder: Path  # job.folder/ID

    record = property(lambda self: self.folder / RECORD)
    history = property(lambda self: self.folder / HISTORY)
    driver_log = property(lambda self: self.folder / DRIVER_LOG)
    cancel_request = property(lambda self: self.folder / CANCEL_REQUEST)
    control_token = property(lambda self: self.folder / TOKEN_FILE)

    def server(self, replica: int) -> Path:
        return self.folder / f"server-{replica}.json"

    def servers(self) -> list[Path]:
        return sorted(self.folder.glob("server-*.json"))

    def rank_exit(self, rank: int) -> Path:
        return self.folder / f"rank-{rank}.exit.json"

    def rank_exits(self) -> list[Path]:
        return sorted(self.folder.glob("rank-*.exit.json"))

    def rendezvous(self, job_id: str) -> Path:
        return self.folder / f"rendezvous-{job_id}.json"

    def rank_log(self, job_id: str, rank: int, kind: str) -> Path:
        """kind: "out" or "err"."""
        return self.folder / f"{job_id}_{rank}_log.{kind}"

    def error_logs(self) -> list[Path]:
        return sorted(self.folder.glob("*_log.err"))


def write_atomically(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Readers never see a half-written file (the old one or the whole new one), nor a torn one after a crash
    (fsynced before the rename). mode applies from the first byte: a secret is never readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
