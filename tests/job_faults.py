"""A serving `launch` in a subprocess, its job's rank processes, and what the fault tests check on the way out."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

# a full batch of the tiny recipe (model.max_batch=8) forced to 440 tokens: seconds of work even on a fast machine
LONG_REQUEST = {"sentences": ["It is a truth universally acknowledged"] * 8, "tokens_to_generate": 440,
                "min_tokens_to_generate": 440, "greedy": True}


class Serving:
    """`launch RECIPE mode=serve ...` in tmp_path, until its first line names the servers."""

    def __init__(self, tmp_path: Path, recipe: str, *overrides: str, env: dict | None = None):
        self.tmp_path = tmp_path
        command = [sys.executable, "-m", "fleetgen.launcher", recipe, "mode=serve", "job.folder=jobs", *overrides]
        self.proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self._stderr: list[str] = []
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()
        assert line.startswith("serving"), (line, self.stderr())
        self.urls = line.split(" at ")[1].split(" (")[0].split()
        self.job_id = (tmp_path / "jobs" / "latest").read_text().strip()
        self.job_folder = tmp_path / "jobs" / self.job_id

    def stderr(self) -> str:
        if self.proc.poll() is not None:
            time.sleep(0.2)  # the reader thread drains what is left
        return "".join(self._stderr)

    def token(self) -> str:
        return (self.job_folder / "control-token").read_text()

    def rank_process(self, rank: int) -> psutil.Process:
        """The process of a rank, found by its job folder and submitit's (local) or Slurm's rank variable."""
        for proc in psutil.process_iter(["cmdline"]):
            if str(self.tmp_path) not in " ".join(proc.info["cmdline"] or []):
                continue
            try:
                env = proc.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if env.get("SUBMITIT_LOCAL_GLOBALID", env.get("SLURM_PROCID")) == str(rank) and \
                    proc.name().startswith("python") and "submitit.core._submit" in " ".join(proc.cmdline()):
                return proc
        raise AssertionError(f"no process for rank {rank}")

    def exit_code(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=120)


def wait_for_failed_health(url: str, timeout: float) -> dict:
    """/health's body once it says failed (a failed leader answers so for a few seconds, then exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = requests.get(f"{url}/health", timeout=5).json()
        except requests.RequestException:
            body = {}
        if body.get("status") == "failed":
            return body
        time.sleep(0.2)
    raise AssertionError(f"{url}/health did not say failed within {timeout} s")


def continue_or_kill(proc: psutil.Process) -> None:
    """A stopped rank must not outlive its test: it is continued (and then exits by itself) or killed."""
    try:
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=20)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        proc.kill()


def processes_of(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def nothing_left(marker: str, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while processes_of(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    return processes_of(marker)
