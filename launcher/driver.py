"""The batch driver of a detached job: wait for the replicas, stream the batch through them, shut them down.

It runs on a thread of global rank 0's task (see detached.py), so that the task's main thread stays free for
submitit's signal handler, which drains the driver before requeueing the job.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import httpx

from fleetgen.launcher import batch
from fleetgen.launcher.batch.outputlock import lock_output
from fleetgen.launcher.batch.progress import plural
from fleetgen.launcher.jobrecord import server_urls
from fleetgen.slurm.control_token import read_token
from fleetgen.slurm.rank_exit import read_exits

POLL_S = 0.5


class Driver:
    def __init__(self, plan: batch.BatchPlan, job_folder: Path, rank0: subprocess.Popen, job: dict):
        self.plan, self.cfg, self.job_folder, self.rank0 = plan, plan.cfg, job_folder, rank0
        self.job = job  # launcher/job.py job_ref(): the output's lock names it, and it takes over its own note
        self.drain = threading.Event()
        self.summary: batch.Summary | None = None
        self.servers_stopped = False
        self.error: BaseException | None = None

    def run(self) -> None:
        """The thread's body: its outcome is left in .summary (None if drained before the start) or .error."""
        token = None
        try:
            token = read_token(self.job_folder, self.cfg.server.health_timeout_s)
            urls = self._wait_until_healthy()
            if urls is not None:
                print(f"driver: {plural(len(urls), 'replica')} healthy: {' '.join(urls)}", flush=True)
                with lock_output(self.plan.output, job=self.job):  # batch.run takes it again, as its own
                    self.summary = batch.run(self.plan, urls, token, self.drain)
        except Exception as e:  # reported by the task's main thread, which fails the job with it
            self.error = e
        if not self.drain.is_set():  # finished, stopped or failed: no replica has anything left to do
            self._shut_down(server_urls(self.job_folder, self.cfg.parallel.replicas), token)
            self.servers_stopped = True

    def _wait_until_healthy(self) -> list[str] | None:
        """Every replica's URL once all answer /health 200; None if asked to drain first."""
        deadline = time.monotonic() + self.cfg.server.health_timeout_s
        with httpx.Client(timeout=5) as client:
            while not self.drain.is_set():
                exits = {rank: why or "ended" for rank, why in read_exits(self.job_folder).items()}
                if self.rank0.poll() is not None:
                    exits.setdefault(0, f"exited with code {self.rank0.returncode}")
                if exits:
                    raise RuntimeError("a rank exited before the servers were healthy: " + "; ".join(
                        f"rank {rank} {why}" for rank, why in sorted(exits.items())) + " (launch logs JOB --rank N)")
                urls = server_urls(self.job_folder, self.cfg.parallel.replicas)
                health = [_health(client, url) for url in urls]
                failed = [f"{url}: {body.get('error')}" for url, body in zip(urls, health)
                          if body.get("status") == "failed"]
                if failed:
                    raise RuntimeError(f"a replica failed while loading: {'; '.join(failed)}")
                if len(urls) == self.cfg.parallel.replicas and all(b.get("status") == "ready" for b in health):
                    return urls
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the servers were not healthy after {self.cfg.server.health_timeout_s:g} s "
                                       f"(server.health_timeout_s); found {len(urls)} of "
                                       f"{self.cfg.parallel.replicas}: {health}")
                self.drain.wait(POLL_S)
        return None

    def _shut_down(self, urls: list[str], token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for url in urls:
            try:
                httpx.post(f"{url}/shutdown", timeout=5, headers=headers)
            except httpx.HTTPError:
                pass  # a replica already lost: its ranks have ended


def _health(client: httpx.Client, url: str) -> dict:
    try:
        return client.get(f"{url}/health").json()
    except (httpx.HTTPError, ValueError):
        return {}
