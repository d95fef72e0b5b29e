"""Detached batch jobs: one job runs the whole pipeline inside its allocation and outlives the login session.

Every task of the job runs DetachedRun, which starts the task's model rank as a child process (same node, same
environment) and waits for it. Global rank 0's task also runs the batch driver (driver.py) on a thread and
decides the job's outcome: the job ends COMPLETED when every item is done, FAILED when the batch stops or
items failed. Keeping the driver, and each task's exit status, out of the model's processes makes a crashed,
hung or killed rank a lost replica (the batch carries on with the others), not a lost job.
The driver's output goes to driver.log in the job folder; the ranks' to submitit's per-task logs.

Time limits and preemption use submitit's checkpoint mechanism: Slurm sends USR2 batch.drain_timeout_s +
job.grace_period_s before the end; submitit's handler on rank 0's task calls checkpoint(), which drains the
driver (no new items, in-flight ones get batch.drain_timeout_s, the ledger is flushed), then submitit requeues
the job under the same id and the next start resumes from the ledger. `launch cancel` asks the driver, through
the job folder, to drain and then cancel its own job.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import submitit

from fleetgen.conf.schema import LaunchConfig
from fleetgen.launcher import batch
from fleetgen.launcher.batch.progress import plural
from fleetgen.launcher.driver import Driver
from fleetgen.launcher.job import job_ref
from fleetgen.launcher.jobrecord import append_event, write_record
from fleetgen.slurm.job_folder import CANCEL_REQUEST, DRIVER_LOG, JobPaths
from fleetgen.slurm.control_token import write_token
from fleetgen.slurm.environment import RankEnvironment
from fleetgen.slurm.job_control import JobControl, control_class

POLL_S = 0.5
PR_SET_PDEATHSIG = 1


def submit(cfg: LaunchConfig, plan: batch.BatchPlan) -> str:
    """Submit the detached job and return its id; the caller has validated everything (`plan`)."""
    folder = Path(cfg.job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # job folders hold control tokens, and submitit's pickles pass through here
    with _outliving_this_terminal(cfg, folder):
        job = JobControl.submit(cfg, folder, DetachedRun(), plan, str(folder))
    try:
        (folder / "%j").rmdir()  # submitit creates the folder pattern itself, unformatted
    except OSError:
        pass  # not empty, or gone already: another launcher submitting from the same job.folder
    job_folder = folder / job.job_id
    write_token(job_folder)  # the ranks wait for it; the driver sends it
    write_record(folder, job_folder, {
        "job_id": job.job_id, "kind": cfg.cluster.kind, "recipe": cfg.recipe, "mode": "batch", "detached": True,
        "output": cfg.batch.output,
        "replicas": cfg.parallel.replicas, "grace_period_s": cfg.job.grace_period_s,
        "submitted": datetime.now().isoformat(timespec="seconds")})
    return job.job_id


@contextmanager
def _outliving_this_terminal(cfg: LaunchConfig, folder: Path):
    """The local executor's job is a child process of `launch`: it must not hold the terminal's output (a
    caller reading it would wait for the job) nor die of the terminal's hangup."""
    if cfg.cluster.kind != "local":
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited by the job's processes
    sys.stdout.flush()
    sys.stderr.flush()
    with open(folder / "local-jobs.log", "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        signal.signal(signal.SIGHUP, hangup)


class DetachedRun(submitit.helpers.Checkpointable):
    """What every task of a detached job runs (submitit pickles it with its arguments)."""

    def __init__(self):
        self._running: _RunningDriver | None = None

    def __getstate__(self) -> dict:
        return {}  # a requeued job starts afresh: the threads and processes of this attempt stay behind

    def __setstate__(self, state: dict) -> None:
        self._running = None

    def __call__(self, plan: batch.BatchPlan, folder: str) -> None:
        env = RankEnvironment.detect()
        if env.global_rank == 0:
            self._running = _RunningDriver(plan, Path(folder) / env.job_id, folder, env)
            self._running.run()
            return
        rank = _start_rank(plan.cfg, folder)
        code = rank.wait()
        if code:  # its replica is lost: the driver reports it and carries on with the others
            print(f"rank {env.global_rank} exited with code {code}", file=sys.stderr, flush=True)

    def checkpoint(self, plan: batch.BatchPlan, folder: str) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on rank 0's task on USR2, then requeues the job."""
        if self._running is not None:
            self._running.drain_for_requeue()
        return super().checkpoint(plan, folder)


class _RunningDriver:
    """Global rank 0's task: the model's rank 0 as a child process, the driver on a thread."""

    def __init__(self, plan: batch.BatchPlan, job_folder: Path, folder: str, env: RankEnvironment):
        self.plan, self.cfg, self.job_folder, self.folder, self.env = plan, plan.cfg, job_folder, folder, env
        self.started = time.monotonic()
        self.driver: Driver | None = None
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        self.job_folder.mkdir(parents=True, exist_ok=True)
        for stale in [*JobPaths(self.job_folder).servers(), *JobPaths(self.job_folder).rank_exits()]:
            stale.unlink()  # an earlier attempt's addresses and last words
        rank0 = _start_rank(self.cfg, self.folder)  # from the main thread: PDEATHSIG follows this thread
        _redirect_output(self.job_folder / DRIVER_LOG)
        append_event(self.job_folder, "started", attempt=self.env.restart_count, node=self.env.first_host)
        self.driver = Driver(self.plan, self.job_folder, rank0, job_ref(self.env.cluster, self.env.job_id))
        self.thread = threading.Thread(target=self.driver.run, name="fleetgen-driver", daemon=True)
        self.thread.start()
        try:
            while self.thread.is_alive():
                self.thread.join(POLL_S)
                if (self.job_folder / CANCEL_REQUEST).exists():
                    self.driver.drain.set()
        finally:  # servers asked to stop get the grace period; others are stopped now
            _stop(rank0, self.cfg.job.grace_period_s if self.driver.servers_stopped else 0)
        self._finish()

    def _finish(self) -> None:
        driver, summary = self.driver, self.driver.summary
        if driver.error is not None:
            append_event(self.job_folder, "failed", error=str(driver.error))
            raise RuntimeError(f"the batch driver failed: {driver.error}") from driver.error
        if (self.job_folder / CANCEL_REQUEST).exists():
            append_event(self.job_folder, "cancelled", **_counts(summary))
            _cancel_own_job(self.env)
            return
        code = batch.report(summary, time.monotonic() - self.started)  # into driver.log
        outcome = {"stop_reason": summary.stop_reason} if not summary.complete else {}
        if summary.lost_replicas:
            outcome["lost_replicas"] = summary.lost_replicas
        append_event(self.job_folder, "finished" if summary.complete else "stopped", **_counts(summary), **outcome)
        if code:  # the batch path's exit code 1: the job fails, and says why
            raise RuntimeError(f"the batch {'stopped: ' + summary.stop_reason if not summary.complete else 'ended'}"
                               f" with {summary.failed} of {plural(summary.items, 'item')} failed; see {DRIVER_LOG}")

    def drain_for_requeue(self) -> None:
        """On submitit's signal (main thread): stop the driver within the grace period, record why."""
        elapsed = time.monotonic() - self.started
        reason = "timed-out" if _timed_out(elapsed, self.cfg.cluster.time_min) else "preempted"
        print(f"driver: USR2 after {elapsed:.0f} s ({reason}): draining, then requeueing", flush=True)
        if self.driver is not None:
            self.driver.drain.set()
            # batch.run bounds the in-flight items by drain_timeout_s; then the ledger is flushed
            self.thread.join(self.cfg.batch.drain_timeout_s + self.cfg.job.grace_period_s / 2)
        summary = self.driver.summary if self.driver is not None else None
        # submitit requeues next, unless time-outs have used up job.max_requeues (then the job ends here)
        append_event(self.job_folder, "drained", reason=reason, attempt=self.env.restart_count,
                     elapsed_s=round(elapsed, 1), **_counts(summary))


def _timed_out(elapsed_s: float, time_min: int) -> bool:
    """submitit's own rule (SignalHandler.has_timed_out): near the limit it is a time-out, else a preemption."""
    limit_s = time_min * 60
    return elapsed_s >= min(0.8 * limit_s, limit_s - 600)


def _counts(summary: batch.Summary | None) -> dict:
    return {} if summary is None else {"done": summary.done, "failed": summary.failed, "items": summary.items}


def _start_rank(cfg: LaunchConfig, folder: str) -> subprocess.Popen:
    """This task's model rank, with the task's environment (so it knows its rank) and output (submitit's log)."""
    child = subprocess.Popen([sys.executable, "-m", "fleetgen.launcher.detached", folder], stdin=subprocess.PIPE,
                             text=True)
    child.stdin.write(cfg.model_dump_json())
    child.stdin.close()
    return child


def _redirect_output(path: Path) -> None:
    """From here on this process writes to driver.log; rank 0's child keeps submitit's log of task 0."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)


def _stop(child: subprocess.Popen, grace_s: float) -> None:
    try:
        child.wait(grace_s)
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _cancel_own_job(env: RankEnvironment) -> None:
    """Drained on `launch cancel`: end the job as cancelled, not completed."""
    print("driver: drained; cancelling the job", flush=True)
    control_class(env.cluster).cancel_id(env.job_id)
    time.sleep(3600)  # until the cancellation ends this process


def _rank_main(folder: str) -> None:
    from fleetgen.model.serve.worker import run_rank

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # its task gone (killed): the rank goes too
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # Slurm signals every process of the step; the driver drains
    cfg = LaunchConfig.model_validate_json(sys.stdin.read())
    run_rank(cfg, folder)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
