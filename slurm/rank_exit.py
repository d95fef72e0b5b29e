"""A rank's last word in the job folder: why it is exiting, for the launcher to report.

Under Slurm the launcher cannot see a rank's process (it runs on another node), and the job runs on while any
rank lives: a rank writes `rank-<N>.exit.json` before it exits (reason null when it ends normally), so the
launcher learns at once that the job cannot become healthy, and why. A rank killed outright writes nothing,
but its replica's other ranks notice and write theirs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fleetgen.slurm.job_folder import JobPaths, write_atomically


def write_exit(job_folder: Path | str, rank: int, node: str, reason: Optional[str]) -> None:
    write_atomically(JobPaths(Path(job_folder)).rank_exit(rank),
                     json.dumps({"rank": rank, "node": node, "reason": reason}))


def read_exits(job_folder: Path | str) -> dict[int, Optional[str]]:
    """rank -> `on NODE: reason` (None for a normal end), for every rank that has written its last word."""
    exits = {}
    for path in JobPaths(Path(job_folder)).rank_exits():
        record = json.loads(path.read_text())
        exits[record["rank"]] = f"on {record['node']}: {record['reason']}" if record["reason"] else None
    return exits
