"""Who owns a job: the launcher process that submitted it (host, pid and the pid's start time), so that a job
is reaped only when its owner is provably gone, never because another launcher shares its job.folder."""
from __future__ import annotations

import socket

import psutil

START_TIME_SLACK_S = 1.0  # create_time() is rounded differently by different readers


def identity(pid: int | None = None) -> dict:
    """This process (or `pid`, on this host): {"host", "pid", "pid_started"}."""
    process = psutil.Process(pid)
    return {"host": socket.gethostname(), "pid": process.pid, "pid_started": process.create_time()}


def describe(owner: dict) -> str:
    return f"pid {owner['pid']} on {owner['host']}"


def is_gone(owner: dict) -> bool:
    """True only when the owner has provably ended: on this host, its pid is dead or now another process's.
    An owner on another host cannot be checked from here, so it is taken to live."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        process = psutil.Process(owner["pid"])
        started = process.create_time()
        zombie = process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    return zombie or abs(started - owner["pid_started"]) > START_TIME_SLACK_S


def is_alive_here(owner: dict) -> bool:
    """The owner runs on this host (so it can be signalled from here)."""
    return owner.get("host") == socket.gethostname() and not is_gone(owner)
