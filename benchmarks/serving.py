"""fleetgen as users run it: `launch ... mode=serve` driven by concurrent HTTP clients, and a `launch`
batch end to end. Each launcher is a subprocess; its job's ranks are the local executor's processes."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Optional

import httpx

SERVING = re.compile(r"^serving \S+ at (.+?) \(PUT /generate")
LOGS = re.compile(r"logs in (\S+)")


class LaunchedServer:
    """`launch RECIPE mode=serve OVERRIDES` until stopped; .urls once healthy, .healthy_s after the launch.
    stop_signal: what stop() sends the launcher (SIGTERM and SIGINT both tear its job down)."""

    def __init__(self, workdir: Path, recipe: str, overrides: list[str], timeout_s: float = 900,
                 stop_signal: signal.Signals = signal.SIGTERM):
        workdir.mkdir(parents=True, exist_ok=True)
        self.stop_signal, self.returncode = stop_signal, None
        self.stderr_path = workdir / "launcher.err"
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fleetgen.launcher", recipe, "mode=serve", f"job.folder={workdir / 'jobs'}",
             *overrides], cwd=workdir, stdout=subprocess.PIPE, stderr=self.stderr_path.open("w"), text=True)
        self.urls = self._wait_for_urls(timeout_s)
        self.healthy_s = time.monotonic() - started

    def _wait_for_urls(self, timeout_s: float) -> list[str]:
        timer = threading.Timer(timeout_s, self.process.kill)
        timer.start()
        try:
            for line in self.process.stdout:
                match = SERVING.match(line)
                if match:
                    return match.group(1).split()
        finally:
            timer.cancel()
        raise RuntimeError(f"launch did not serve: {self.stderr_path.read_text()[-3000:]}")

    def rank_log(self, rank: int = 0) -> str:
        folder = Path(LOGS.search(self.stderr_path.read_text()).group(1))
        return next(folder.glob(f"*_{rank}_log.out")).read_text()

    def stop(self) -> None:
        """The stop signal: the launcher tears its job down, as on Ctrl-C."""
        self.process.send_signal(self.stop_signal)
        try:
            self.returncode = self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LaunchedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def generate_body(prompt: str, new: int) -> dict:
    """Greedy, every sequence forced to exactly `new` tokens (no end string, eos banned until then)."""
    return {"sentences": [prompt], "tokens_to_generate": new, "min_tokens_to_generate": new, "greedy": True,
            "end_strings": []}


def clients_round(urls: list[str], prompts: list[str], clients: int, new: int,
                  per_client: int) -> Callable[[], float]:
    """After one warm-up request: a round's tokens/s of clients threads, each sending per_client one-prompt
    PUT /generate requests back to back over its own connection, for references.interleaved() to call. The
    connections open before the clock starts: an httpx.Client loads its TLS certificates when made (0.9 s of
    CPU for 16 of them, taken from the server on the same two cores)."""
    def client(index: int, http: httpx.Client) -> None:
        url = urls[index % len(urls)]  # replicas share the clients
        for r in range(per_client):
            prompt = prompts[(index * per_client + r) % len(prompts)]
            response = http.put(f"{url}/generate", json=generate_body(prompt, new))
            if response.status_code != 200:
                raise RuntimeError(f"a request failed: {response.status_code} {response.text}")

    def measure() -> float:
        with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(clients) as pool:
            https = [stack.enter_context(httpx.Client(timeout=600)) for _ in range(clients)]
            started = time.perf_counter()
            for done in [pool.submit(client, i, http) for i, http in enumerate(https)]:
                done.result()
            return clients * per_client * new / (time.perf_counter() - started)

    with httpx.Client(timeout=600) as http:
        client(0, http)  # the first request pays one-off costs
    return measure


def launch_batch(workdir: Path, recipe: str, overrides: list[str], prompts: list[str], new: int,
                 concurrency: int) -> dict:
    """`launch RECIPE batch.input=...` end to end: its own tokens/s (the batch phase) and the wall time."""
    workdir.mkdir(parents=True, exist_ok=True)
    records = workdir / "prompts.jsonl"
    records.write_text("".join(json.dumps({"prompt": p, "tokens_to_generate": new, "min_tokens_to_generate": new,
                                           "greedy": True, "end_strings": []}) + "\n" for p in prompts))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fleetgen.launcher", recipe, f"batch.input={records}",
         f"batch.output={workdir / 'results.jsonl'}", f"batch.concurrency={concurrency}",
         "batch.prompts_per_request=1", "batch.restart=true",  # not the last run's ledger: all of it, again
         f"job.folder={workdir / 'jobs'}", *overrides],
        cwd=workdir, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    match = re.search(r"(\d+) generated tokens, ([\d.]+) tokens/s", result.stdout)
    if result.returncode or not match:
        raise RuntimeError(f"launch batch failed ({result.returncode}): {result.stderr[-3000:]}")
    return {"tokens": int(match.group(1)), "tokens_per_s": float(match.group(2)), "wall_s": wall}


def startup_breakdown(server: LaunchedServer) -> dict[str, Optional[float]]:
    """From rank 0's log (model/serve/worker.py): process start to the rank joining the others (imports,
    rendezvous), loading its shard, the warm-up step."""
    log = server.rank_log(0)
    found = {}
    for name, pattern in (("imports_and_rendezvous_s", r"started ([\d.]+) s after its process"),
                          ("load_s", r"loaded in ([\d.]+) s"), ("warm_up_s", r"warmed up in ([\d.]+) s")):
        match = re.search(pattern, log)
        found[name] = float(match.group(1)) if match else None
    return {"healthy_s": server.healthy_s, **found}

