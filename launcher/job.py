"""The job's life on the launcher's side: submit, wait until every server is healthy, shut down — always."""
from __future__ import annotations

import json
import signal
import sys
import time
import typing
from datetime import datetime
from pathlib import Path

import httpx
import psutil

from fleetgen.launcher import owner
from fleetgen.launcher.control import ACTIVE_STATES
from fleetgen.launcher.errors import LaunchError
from fleetgen.launcher.jobrecord import mark_ended, server_urls, write_record
from fleetgen.conf.schema import LaunchConfig
from fleetgen.slurm.control_token import write_token
from fleetgen.slurm.job_folder import RECORD, JobPaths
from fleetgen.slurm.job_control import JobControl, control_class

CANCEL_WAIT_S = 60
FAILED_JOB_END_S = 10  # a failed replica's ranks exit by themselves within this; a stopped one never does


def submit(cfg: LaunchConfig) -> RunningJob:
    folder = Path(cfg.job.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # job folders hold control tokens, and submitit's pickles pass through here
    reap_stale_jobs(folder)
    control = JobControl.submit(cfg, folder, run_rank, cfg, str(folder))
    _remove_if_empty(folder / "%j")  # submitit creates the folder pattern itself, unformatted
    token = write_token(control.folder)
    write_record(folder, control.folder, {
        "job_id": control.job_id, "kind": cfg.cluster.kind, "recipe": cfg.recipe, "mode": cfg.mode,
        "output": cfg.batch.output if cfg.mode == "batch" else None, "replicas": cfg.parallel.replicas,
        "grace_period_s": cfg.job.grace_period_s, "submitted": datetime.now().isoformat(timespec="seconds"),
        "owner": owner.identity(), **job_ref(cfg.cluster.kind, control.job_id)})
    ranks = cfg.parallel.world_size
    print(f"submitted job {control.job_id} ({cfg.cluster.kind}, {ranks} rank{'s' if ranks != 1 else ''}); "
          f"logs in {control.folder}", file=sys.stderr)
    return RunningJob(control, cfg, folder, token)


def run_rank(cfg: LaunchConfig, folder: str) -> None:
    """What submitit runs on every task. submitit pickles it by name, so the model code (and torch) is imported
    by the ranks, never by the launcher (tests/test_login_node.py)."""
    from fleetgen.model.serve.worker import run_rank as rank

    rank(cfg, folder)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty, or gone already: another launcher submitting from the same job.folder


def job_ref(kind: str, job_id: str) -> dict:
    """What tells a job apart for still_runs(): its scheduler (cluster.kind), its id and, for a local job, its
    controller's start time (a local job's id is a pid, which may be reused)."""
    return {"kind": kind, "job_id": job_id, "job_started": _local_job_started(kind, job_id)}


def _local_job_started(kind: str, job_id: str) -> float | None:
    """A local job's id is its controller's pid: its start time tells a reused pid from the job."""
    if kind != "local":
        return None
    try:
        return psutil.Process(int(job_id)).create_time()
    except psutil.NoSuchProcess:
        return None


def reap_stale_jobs(folder: Path) -> None:
    """Cancel the jobs of job.folder whose launcher is provably gone (crashed, killed) and which still run.
    A job whose launcher lives, here or on another host, is never touched."""
    for path in sorted(folder.glob(f"*/{RECORD}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being written, or not ours
        who = record.get("owner")
        if record.get("ended") or not who or not owner.is_gone(who):
            continue
        if still_runs(record):
            print(f"job {record['job_id']}: its launcher ({owner.describe(who)}) is gone", file=sys.stderr)
            control_class(record["kind"]).reap(record["job_id"])
        mark_ended(path.parent)


def still_runs(record: dict) -> bool:
    """The job a job_ref() names is still queued or running, by its scheduler's word."""
    if record["kind"] == "local":
        started = _local_job_started("local", record["job_id"])
        return started is not None and abs(started - (record.get("job_started") or 0)) <= owner.START_TIME_SLACK_S
    state = control_class(record["kind"]).state_of(record["job_id"])
    return state is not None and state.split()[0] in ACTIVE_STATES


class RunningJob:
    def __init__(self, control: JobControl, cfg: LaunchConfig, folder: Path, token: str):
        self.control, self.cfg, self.folder = control, cfg, folder
        self.token = token  # the job's control token: POST /shutdown, and in batch mode every request
        self.job_folder = control.folder
        self.urls: list[str] = []

    @property
    def job_id(self) -> str:
        return self.control.job_id

    def wait_until_healthy(self) -> list[str]:
        """The servers' URLs once every replica answers /health with 200. Fails at once if the job ends, a
        rank exits or a replica reports that it failed."""
        deadline = time.monotonic() + self.cfg.server.health_timeout_s
        shown = ""
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.control.ended():
                    raise LaunchError(f"job {self.job_id} ended before its server was healthy. {self.end_report()}")
                self._fail_on_rank_exits()
                status = self.control.queue_state()
                if status != shown:
                    print(f"job {self.job_id}: {status}", file=sys.stderr)
                    shown = status
                urls = server_urls(self.job_folder, self.cfg.parallel.replicas)
                health = [_health(client, url) for url in urls]
                failed = [f"{url}: {body['error']}" for url, body in zip(urls, health)
                          if body.get("status") == "failed"]
                if failed:
                    raise LaunchError(f"job {self.job_id}: a replica failed before it was healthy: "
                                      f"{'; '.join(failed)}\n{self.error_tail()}")
                if len(urls) == self.cfg.parallel.replicas and all(b.get("status") == "ready" for b in health):
                    self.urls = urls
                    return urls
                time.sleep(0.5)
        raise LaunchError(f"job {self.job_id} was not healthy after {self.cfg.server.health_timeout_s:.0f} s "
                          f"(server.health_timeout_s); last state: {shown}. It will be cancelled.\n"
                          f"{self.error_tail()}")

    def _fail_on_rank_exits(self) -> None:
        failures = self.failure_report()
        if failures:
            raise LaunchError(f"job {self.job_id}: a rank exited before the job was healthy: {failures}\n"
                              f"{self.error_tail()}")

    def failure_report(self) -> str:
        """Why ranks exited, as they told it (empty when none did)."""
        exits = self.control.rank_exits()
        return "; ".join(f"rank {rank} {why}" for rank, why in sorted(exits.items()))

    def error_tail(self, lines: int = 25) -> str:
        """The last lines of every rank's stderr that has something to say."""
        tails = []
        for path in JobPaths(self.job_folder).error_logs():
            text = path.read_text(errors="replace").strip().splitlines()
            if text:
                tails.append(f"--- {path} (last {min(lines, len(text))} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(tails) or f"(no error output in {self.job_folder})"

    def wait_for_end(self) -> typing.NoReturn:
        """Serve mode: block until Ctrl-C; a job that ends by itself (time limit, scancel, every replica failed)
        is reported, and so is each replica that fails while others serve on."""
        told: set[int] = set()
        per_replica = self.cfg.parallel.tensor * self.cfg.parallel.pipeline
        while not self.control.ended():
            exits = self.control.rank_exits()
            for rank in sorted(set(exits) - told):
                print(f"launch: job {self.job_id}: rank {rank} {exits[rank]}", file=sys.stderr)
            told |= set(exits)
            if len({rank // per_replica for rank in exits}) == self.cfg.parallel.replicas and \
                    not self._ended_within(FAILED_JOB_END_S):
                raise LaunchError(f"job {self.job_id}: every replica failed while serving: {self.failure_report()}"
                                  f"\n{self.error_tail()}")
            time.sleep(2)
        raise LaunchError(f"job {self.job_id} ended while serving. {self.end_report()}")

    def end_report(self) -> str:
        failures = self.failure_report()
        return (f"Its state: {self.control.final_state()}.\n" + (f"Ranks that exited: {failures}\n" if failures else "")
                + self.error_tail())

    def shut_down(self) -> None:
        """Ask each server to stop; cancel the job if none listened or it outlives the grace period."""
        asked = 0
        for url in self.urls or server_urls(self.job_folder, self.cfg.parallel.replicas):
            try:
                asked += httpx.post(f"{url}/shutdown", timeout=5,
                                    headers={"Authorization": f"Bearer {self.token}"}).status_code < 300
            except httpx.HTTPError:
                pass  # a server that does not answer is cancelled below
        if not (asked and self._ended_within(self.cfg.job.grace_period_s)):
            self.control.cancel()
            if not self._ended_within(CANCEL_WAIT_S):
                raise LaunchError(f"job {self.job_id} did not end after it was cancelled; "
                                  f"check `squeue -j {self.job_id}`")
        mark_ended(self.job_folder)

    def _ended_within(self, seconds: float) -> bool:
        """No process of the job is left by then."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.control.gone():
                return True
            time.sleep(0.5)
        return self.control.gone()


def _health(client: httpx.Client, url: str) -> dict:
    """/health's body; {} while the server cannot be reached."""
    try:
        return client.get(f"{url}/health").json()
    except (httpx.HTTPError, ValueError):
        return {}


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def raise_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the job is torn down on the way out."""
    signal.signal(signal.SIGTERM, _interrupt)
