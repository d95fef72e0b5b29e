"""The batch driver at cluster scale: items/s, driver CPU per item, peak threads and peak RSS from 4 to 1,024
replicas, against fake replicas that answer at once (no model).

The fake replicas are ONE separate asyncio process listening on as many ports as the largest count (NeMo's
PUT /generate and GET /health, a minimal HTTP/1.1 with keep-alive). For each count a fresh driver process runs
prepare() and run() (dispatch, ledger, final merge and audit) over the first N ports with batch.concurrency=8
and the default batch.prompts_per_request (4). Measured in the driver, over run(): items/s (items / wall),
CPU (user + system) per item, peak OS threads (/proc/self/status, sampled every 10 ms, the sampler not
counted), peak connections (open files beyond those before run(), every 0.25 s; with batch.shards > 1 not the
drivers', processes of their own) and peak RSS (VmHWM, whole process); and the fake replicas' CPU per item
(they share the machine's cores with the driver, so they bound items/s). Targets: ≤ 0.3 ms CPU per item at every
count, items/s at 1,024 ≥ 0.5× at 4, ≤ 32 threads, RSS flat (< 150 MB at 1,024 replicas with 1 M records).

    python -m benchmarks.dispatch_scale [--replicas 4 64 256 1024] [--records 100000]
    python -m benchmarks.dispatch_scale --replicas 1024 --records 1000000      (RSS over a long input)
    python -m benchmarks.dispatch_scale --replicas 1024 --shards 4             (four drivers, batch.shards)
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

MB = 1 << 20
HEALTH = b'{"status": "ready"}'


# ---- the fake replicas (their own process)

class FakeReplica(asyncio.Protocol):
    """Answers each request as soon as its body is in; keeps the connection open."""

    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body, self.buffer = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
            answer = HEALTH if head.startswith("GET") else generate(json.loads(body))
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(answer)).encode() + b"\r\n\r\n" + answer)


def generate(body: dict) -> bytes:
    """NeMo's /generate answer: each sentence is its prompt and 3 new tokens."""
    answer = {"sentences": [], "token_ids": [], "offsets": [], "tokens": [], "logprob": None}
    for prompt in body["sentences"]:
        prompt_tokens = max(1, len(prompt) // 4)
        answer["sentences"].append(prompt + " a b c")
        answer["token_ids"].append(list(range(prompt_tokens + 3)))
        answer["offsets"].append(list(range(prompt_tokens)) + [len(prompt), len(prompt) + 2, len(prompt) + 4])
    return json.dumps(answer).encode()


async def serve(count: int, port_file: Path) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(FakeReplica, "127.0.0.1", 0, backlog=64) for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(json.dumps(ports))
    os.replace(tmp, port_file)
    await asyncio.Event().wait()


# ---- one driver run (its own process)

def drive(workdir: Path, shards: int, urls: list[str]) -> dict:
    from fleetgen.launcher.batch import prepare, run
    from tests.batch_stub import batch_config

    cfg = batch_config(workdir / "in.jsonl", workdir / "out.jsonl", concurrency=8, restart=True,
                       generation={"tokens_to_generate": 3}, shards=shards)
    cfg.parallel.replicas = len(urls)
    plan = prepare(cfg)
    peak_threads, peak_files, stop = [0], [0], threading.Event()
    files_before = len(os.listdir("/proc/self/fd"))

    def sample() -> None:
        for tick in itertools.count():
            if stop.wait(0.01):
                return
            peak_threads[0] = max(peak_threads[0], status("Threads:") - 1)
            if tick % 25 == 0:  # open files (the connections, mostly) every 0.25 s: listing 8,192 costs CPU
                peak_files[0] = max(peak_files[0], len(os.listdir("/proc/self/fd")) - files_before)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0, wall0 = cpu_s(), time.perf_counter()
    summary = run(plan, urls, None)
    cpu, wall = cpu_s() - cpu0, time.perf_counter() - wall0
    stop.set()
    sampler.join()
    assert summary.complete and summary.audit["ok"] and summary.failed == 0, summary
    drivers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # batch.shards > 1: the largest
    return {"replicas": len(urls), "shards": shards, "items": summary.items, "items_per_s": summary.items / wall,
            "cpu_ms_per_item": 1000 * cpu / summary.items, "wall_s": wall, "peak_threads": peak_threads[0],
            "peak_connections": peak_files[0],
            "peak_rss_mb": max(status("VmHWM:") / 1024, drivers)}


def cpu_s() -> float:
    """This process's CPU and its finished children's (the shards' drivers)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


# ---- the whole benchmark

def write_input(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"rec-{i:08d}", "prompt": f"Write a short story about topic number {i}."})
                    + "\n")


def start_replicas(count: int, workdir: Path) -> tuple[subprocess.Popen, list[int]]:
    port_file = workdir / "ports.json"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.dispatch_scale", "--serve", str(count),
                             "--port-file", str(port_file)])
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the fake replicas did not start")
        time.sleep(0.1)
    return proc, json.loads(port_file.read_text())


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[4, 64, 256, 1024])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--shards", type=int, default=1, help="batch.shards: drivers, one process each")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: be the fake replicas
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs="+", help=argparse.SUPPRESS)  # internal: be one driver run
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port_file))
    elif args.drive:
        print(json.dumps(drive(Path(args.drive[0]), int(args.drive[1]), args.drive[2:])))
    else:
        benchmark(args)


def benchmark(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        write_input(workdir / "in.jsonl", args.records)
        replicas, ports = start_replicas(max(args.replicas), workdir)
        rows = []
        try:
            for count in args.replicas:
                urls = [f"http://127.0.0.1:{port}" for port in ports[:count]]
                replicas_cpu = process_cpu_s(replicas.pid)
                result = subprocess.run([sys.executable, "-m", "benchmarks.dispatch_scale", "--drive", str(workdir),
                                         str(args.shards), *urls], capture_output=True, text=True, check=True)
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                spent = process_cpu_s(replicas.pid) - replicas_cpu
                rows[-1]["replicas_cpu_ms_per_item"] = 1000 * spent / args.records
                print(json.dumps(rows[-1]), flush=True)
        finally:
            replicas.kill()
            replicas.wait()
    print(f"\n{date.today()}, {os.cpu_count()} cores, {args.records:,} records, batch.concurrency=8, "
          f"4 prompts per request, batch.shards={args.shards} (threads: the launcher's; RSS: the largest process)")
    print("| replicas | items/s | driver CPU per item | peak threads | peak connections | peak RSS "
          "| fake replicas' CPU per item |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['replicas']:,} | {r['items_per_s']:,.0f} | {r['cpu_ms_per_item']:.3f} ms | "
              f"{r['peak_threads']} | {r['peak_connections']:,} | {r['peak_rss_mb']:.0f} MB "
              f"| {r['replicas_cpu_ms_per_item']:.3f} ms |")
    if len(rows) > 1:
        print(f"\nitems/s at {rows[-1]['replicas']:,} over {rows[0]['replicas']:,} replicas: "
              f"{rows[-1]['items_per_s'] / rows[0]['items_per_s']:.2f}×")


if __name__ == "__main__":
    main()
