"""Agree on torch.distributed's init_method through the job folder: rank 0 picks a port and publishes it.

Ports are asked from the OS rather than fixed: emulated Slurm nodes share one network namespace, and on a real
cluster several jobs may share a node.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from fleetgen.slurm.environment import RankEnvironment
from fleetgen.slurm.job_folder import JobPaths, write_atomically

POLL_S = 0.1


def rendezvous(job_folder: Path, env: RankEnvironment, timeout_s: float) -> str:
    """The `tcp://HOST:PORT` init_method of this job, the same on every rank.

    Rank 0 writes `<job_folder>/rendezvous-<job_id>.json`; the other ranks wait for it up to timeout_s.
    """
    path = JobPaths(Path(job_folder)).rendezvous(env.job_id)
    if env.global_rank == 0:
        host = f"[{env.first_host}]" if ":" in env.first_host else env.first_host  # IPv6 literal
        init_method = f"tcp://{host}:{free_port()}"
        write_atomically(path, json.dumps({"init_method": init_method, "restart_count": env.restart_count}))
        return init_method
    return _wait_for(path, env, timeout_s)


def free_port() -> int:
    """A port nobody listens on now; rank 0's TCPStore binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _wait_for(path: Path, env: RankEnvironment, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        record = _read(path)
        # A requeued job keeps its id: a file from an earlier attempt names a port nobody listens on anymore.
        if record is not None and record["restart_count"] == env.restart_count:
            return record["init_method"]
        if time.monotonic() >= deadline:
            found = "only an earlier attempt's" if record is not None else "no"
            raise TimeoutError(f"rank {env.global_rank} of job {env.job_id}: {path} was not written within "
                               f"{timeout_s:g} s ({found} file found); did rank 0 start? See its log.")
        time.sleep(POLL_S)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
