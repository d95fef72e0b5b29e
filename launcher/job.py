"""The job's life on the launcher's side: submit, wait until every server is healthy, shut down — always."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import httpx
import psutil
import submitit

from fleetgen.launcher.errors import LaunchError
from fleetgen.conf.schema import LaunchConfig
from fleetgen.slurm.submission import make_executor

ACTIVE_FILE = "active.json"  # the job this folder's launcher is running; left behind only by a crash


def submit(cfg: LaunchConfig) -> RunningJob:
    folder = Path(cfg.job.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    reap_stale_job(folder)
    executor = make_executor(cfg, folder / "%j")
    from fleetgen.model.serve.worker import run_rank  # imported here: the launcher itself needs no model code

    job = executor.submit(run_rank, cfg, str(folder))
    _remove_if_empty(folder / "%j")  # submitit creates the folder pattern itself, unformatted
    (folder / ACTIVE_FILE).write_text(json.dumps({"kind": cfg.cluster.kind, "job_id": job.job_id}))
    print(f"submitted job {job.job_id} ({cfg.cluster.kind}, {cfg.parallel.world_size} ranks); "
          f"logs in {folder / job.job_id}", file=sys.stderr)
    return RunningJob(job, cfg, folder)


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def reap_stale_job(folder: Path) -> None:
    """A launcher that crashed left its job running: cancel it before starting another."""
    active = folder / ACTIVE_FILE
    if not active.exists():
        return
    stale = json.loads(active.read_text())
    if stale["kind"] == "slurm":
        if subprocess.run(["squeue", "-h", "-j", stale["job_id"]], capture_output=True, text=True).stdout.strip():
            subprocess.run(["scancel", stale["job_id"]], check=False)
            print(f"cancelled job {stale['job_id']}, left running by a launcher that crashed", file=sys.stderr)
    else:
        _kill_local_job(int(stale["job_id"]))
    active.unlink()


def _kill_local_job(pid: int) -> None:
    try:
        controller = psutil.Process(pid)
        if "submitit" not in " ".join(controller.cmdline()):
            return  # the pid was reused by an unrelated process
        processes = [controller, *controller.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in processes:
        proc.kill()
    psutil.wait_procs(processes, timeout=10)
    print(f"killed local job {pid}, left running by a launcher that crashed", file=sys.stderr)


class RunningJob:
    def __init__(self, job: submitit.Job, cfg: LaunchConfig, folder: Path):
        self.job, self.cfg, self.folder = job, cfg, folder
        self.job_folder = folder / job.job_id
        self.urls: list[str] = []

    def wait_until_healthy(self) -> list[str]:
        """The servers' URLs once every replica answers /health with 200; fails fast if the job ends."""
        deadline = time.monotonic() + self.cfg.server.health_timeout_s
        shown = ""
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.job.done(force_check=True):
                    raise LaunchError(f"job {self.job.job_id} ended before its server was healthy. "
                                      f"{self.end_report()}")
                status = self._queue_status()
                if status != shown:
                    print(f"job {self.job.job_id}: {status}", file=sys.stderr)
                    shown = status
                urls = self._server_urls()
                if len(urls) == self.cfg.parallel.replicas and all(_healthy(client, url) for url in urls):
                    self.urls = urls
                    return urls
                time.sleep(0.5)
        raise LaunchError(f"job {self.job.job_id} was not healthy after {self.cfg.server.health_timeout_s:.0f} s "
                          f"(server.health_timeout_s); last state: {shown}. It will be cancelled.\n"
                          f"{self.error_tail()}")

    def _server_urls(self) -> list[str]:
        urls = []
        for replica in range(self.cfg.parallel.replicas):
            path = self.job_folder / f"server-{replica}.json"
            if path.exists():
                urls.append(json.loads(path.read_text())["url"])
        return urls

    def _queue_status(self) -> str:
        if self.cfg.cluster.kind != "slurm":
            return "running"
        out = subprocess.run(["squeue", "-h", "-j", self.job.job_id, "-o", "%T %r"],
                             capture_output=True, text=True).stdout.split()
        if not out:
            return "left the queue"
        state, reason = out[0], " ".join(out[1:])
        return f"{state} (reason: {reason})" if state == "PENDING" else state.lower()

    def error_tail(self, lines: int = 25) -> str:
        """The last lines of every rank's stderr that has something to say."""
        tails = []
        for path in sorted(self.job_folder.glob("*_log.err")):
            text = path.read_text(errors="replace").strip().splitlines()
            if text:
                tails.append(f"--- {path} (last {min(lines, len(text))} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(tails) or f"(no error output in {self.job_folder})"

    def wait_for_end(self) -> typing.NoReturn:
        """Serve mode: block until Ctrl-C; a job that ends by itself (time limit, scancel) is reported."""
        while not self.job.done(force_check=True):
            time.sleep(2)
        raise LaunchError(f"job {self.job.job_id} ended while serving. {self.end_report()}")

    def end_report(self) -> str:
        return f"Its state: {self.final_state()}.\n{self.error_tail()}"

    def final_state(self) -> str:
        """Slurm's word on the job; its tasks may have written their results before Slurm records the end."""
        if self.cfg.cluster.kind != "slurm":
            return self.job.state
        deadline = time.monotonic() + 30
        while True:
            state = self.job.get_info(mode="force").get("State", "UNKNOWN")
            if state not in ("RUNNING", "PENDING", "COMPLETING", "UNKNOWN") or time.monotonic() > deadline:
                return state
            time.sleep(1)

    def shut_down(self) -> None:
        """Ask each server to stop; cancel the job if none listened or it outlives the grace period."""
        asked = 0
        for url in self.urls or self._server_urls():
            try:
                asked += httpx.post(f"{url}/shutdown", timeout=5, headers=self._auth()).status_code < 300
            except httpx.HTTPError:
                pass  # a server that does not answer is cancelled below
        if not (asked and self._ended_within(self.cfg.job.grace_period_s)):
            self.job.cancel(check=False)
            if not self._ended_within(60):
                raise LaunchError(f"job {self.job.job_id} did not end after it was cancelled; "
                                  f"check `squeue -j {self.job.job_id}`")
        (self.folder / ACTIVE_FILE).unlink(missing_ok=True)

    def _ended_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._gone():
                return True
            time.sleep(0.5)
        return self._gone()

    def _gone(self) -> bool:
        if self.cfg.cluster.kind == "slurm":
            return not subprocess.run(["squeue", "-h", "-j", self.job.job_id], capture_output=True,
                                      text=True).stdout.strip()
        return not psutil.pid_exists(int(self.job.job_id)) or \
            psutil.Process(int(self.job.job_id)).status() == psutil.STATUS_ZOMBIE

    def _auth(self) -> dict:
        key = self.cfg.server.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def raise_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the job is torn down on the way out."""
    signal.signal(signal.SIGTERM, _interrupt)
