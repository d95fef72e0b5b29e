"""A submitted job as the launcher sees it, one class per cluster kind: its state in the queue, its ranks'
exits, cancelling it, and knowing when it is gone. Nothing outside this module asks the scheduler."""
from __future__ import annotations

import abc
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable

import psutil
import submitit

from fleetgen.conf.schema import LaunchConfig
from fleetgen.slurm.rank_exit import read_exits
from fleetgen.slurm.submission import make_executor

FINAL_STATE_WAIT_S = 30  # Slurm records a job's end a moment after its tasks have ended


class JobControl(abc.ABC):
    def __init__(self, job: submitit.Job):
        self.submitted = job
        self.job_id: str = job.job_id
        self.folder: Path = Path(job.paths.folder)

    @staticmethod
    def submit(cfg: LaunchConfig, folder: Path, fn: Callable, *args) -> JobControl:
        """Submit fn(*args) on every rank; folder/<job id> becomes the job folder."""
        job = make_executor(cfg, folder / "%j").submit(fn, *args)
        return control_class(cfg.cluster.kind)(job)

    def ended(self) -> bool:
        """Every rank has exited (or the job was cancelled, or never started)."""
        return self.submitted.done(force_check=True)

    def cancel(self) -> None:
        self.submitted.cancel(check=False)

    def rank_exits(self) -> dict[int, str]:
        """rank -> why (`on NODE: reason`), for the ranks known to have failed (exited other than normally)."""
        return {rank: why for rank, why in read_exits(self.folder).items() if why is not None}

    @abc.abstractmethod
    def queue_state(self) -> str:
        """A few words for the user: running, or pending and why."""

    @abc.abstractmethod
    def gone(self) -> bool:
        """No process of the job is left."""

    @abc.abstractmethod
    def final_state(self) -> str:
        """The scheduler's word on how the job ended."""

    @classmethod
    @abc.abstractmethod
    def reap(cls, job_id: str) -> None:
        """End a job a crashed launcher left running, if it still runs."""

    @classmethod
    @abc.abstractmethod
    def state_of(cls, job_id: str) -> str | None:
        """From the id alone (`launch status` in another shell): the scheduler's state (PENDING, RUNNING, ...,
        COMPLETED, FAILED, CANCELLED), or None for a job that has ended without the scheduler saying how."""

    @classmethod
    @abc.abstractmethod
    def cancel_id(cls, job_id: str) -> None:
        """Cancel a job known only by its id."""


class LocalJobControl(JobControl):
    """submitit's local executor: a controller process (its pid is the job id) starts one process per rank."""

    def __init__(self, job: submitit.Job):
        super().__init__(job)
        self._ranks: dict[int, psutil.Process] = {}  # every rank process seen so far
        self._unseen: set[int] = set()  # ranks started but never seen running, at the last look

    def queue_state(self) -> str:
        return "running"

    def rank_exits(self) -> dict[int, str]:
        """Also the ranks whose process ended without writing its exit record (killed, or crashed hard)."""
        records = read_exits(self.folder)
        exits = {rank: why for rank, why in records.items() if why is not None}
        seen = self._rank_processes()
        for rank, proc in seen.items():
            if rank not in records and not _running(proc):
                exits[rank] = "exited without a word (killed?)"
        # A rank that ends before the first look is never seen. The controller opens a rank's log files before
        # it starts the rank, so a rank with logs and no process at two looks in a row has ended.
        unseen = {rank for rank in self._started_ranks() if rank not in seen and rank not in records}
        for rank in unseen & self._unseen:
            exits[rank] = "exited without a word (killed?)"
        self._unseen = unseen
        return exits

    def _started_ranks(self) -> set[int]:
        """Ranks whose log files the controller has opened (submitit's ID_RANK_log.out)."""
        ranks = (path.name.removeprefix(f"{self.job_id}_").removesuffix("_log.out")
                 for path in self.folder.glob(f"{self.job_id}_*_log.out"))
        return {int(rank) for rank in ranks if rank.isdigit()}

    def _rank_processes(self) -> dict[int, psutil.Process]:
        try:
            children = psutil.Process(int(self.job_id)).children()
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            if child.pid not in {p.pid for p in self._ranks.values()}:
                try:
                    rank = child.environ().get("SUBMITIT_LOCAL_GLOBALID")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if rank is not None:
                    self._ranks[int(rank)] = child
        return self._ranks

    def gone(self) -> bool:
        return not _job_processes(self.job_id)

    def final_state(self) -> str:
        return self.submitted.state

    @classmethod
    def reap(cls, job_id: str) -> None:
        try:
            controller = psutil.Process(int(job_id))
            if "submitit" not in " ".join(controller.cmdline()):
                return  # the pid was reused by an unrelated process
            processes = [controller, *controller.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in processes:
            proc.kill()
        psutil.wait_procs(processes, timeout=10)
        print(f"killed local job {job_id}, left running by a launcher that crashed", file=sys.stderr)


    @classmethod
    def state_of(cls, job_id: str) -> str | None:
        return "RUNNING" if _job_processes(job_id) else None

    @classmethod
    def cancel_id(cls, job_id: str) -> None:
        controller = _controller(job_id)
        if controller is not None:
            controller.send_signal(signal.SIGINT)  # submitit's controller stops its tasks, then itself


class SlurmJobControl(JobControl):
    """Slurm: squeue for the queue, sacct (through submitit) for the end, scancel to cancel. The ranks run on
    other nodes, so their exits are known from the exit records they leave in the job folder."""

    def queue_state(self) -> str:
        out = _squeue(self.job_id, "%T %r").split()
        if not out:
            return "left the queue"
        state, reason = out[0], " ".join(out[1:])
        return f"{state} (reason: {reason})" if state == "PENDING" else state.lower()

    def gone(self) -> bool:
        return not _squeue(self.job_id)

    def final_state(self) -> str:
        deadline = time.monotonic() + FINAL_STATE_WAIT_S
        while True:
            state = self.submitted.get_info(mode="force").get("State", "UNKNOWN")
            if state not in ("RUNNING", "PENDING", "COMPLETING", "UNKNOWN") or time.monotonic() > deadline:
                return state
            time.sleep(1)

    @classmethod
    def reap(cls, job_id: str) -> None:
        if _squeue(job_id):
            subprocess.run(["scancel", job_id], check=False)
            print(f"cancelled job {job_id}, left running by a launcher that crashed", file=sys.stderr)


    @classmethod
    def state_of(cls, job_id: str) -> str | None:
        queued = _squeue(job_id, "%T")
        if queued:
            return queued
        ended = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                               text=True).stdout.splitlines()
        return ended[-1].strip() if ended else None  # "CANCELLED by 0" is one word here

    @classmethod
    def cancel_id(cls, job_id: str) -> None:
        subprocess.run(["scancel", job_id], check=False)


def control_class(kind: str) -> type[JobControl]:
    return {"local": LocalJobControl, "slurm": SlurmJobControl}[kind]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _controller(job_id: str) -> psutil.Process | None:
    """The local job's controller process (its pid is the job id), if it still runs: not a reused pid."""
    try:
        controller = psutil.Process(int(job_id))
        return controller if _running(controller) and "submitit" in " ".join(controller.cmdline()) else None
    except psutil.NoSuchProcess:
        return None


def _job_processes(job_id: str) -> list[psutil.Process]:
    """The local job's processes still running: its controller, and its ranks, which can outlive the
    controller by a moment (it sends SIGKILL last and does not wait), so that "ended" means none is left."""
    controller = _controller(job_id)
    ranks = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SUBMITIT_LOCAL_JOB_ID") == job_id and _running(proc):
                ranks.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return ([controller] if controller is not None else []) + ranks


def _squeue(job_id: str, fmt: str = "%i") -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", fmt], capture_output=True, text=True).stdout.strip()
