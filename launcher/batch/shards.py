"""batch.shards > 1: several drivers, one process each, for fleets one driver cannot feed.

Driver s owns the records inputs.shard_of gives it and the replicas r with r % shards == s; it keeps its own
ledger (OUTPUT.shard-S-of-N.ledger.jsonl) and progress file. This process starts them, sums their progress
into OUTPUT.progress.json, starts again a driver that dies (killed, out of memory) up to batch.max_retries
times (it resumes from its ledger), and, once every shard's items are finished, writes OUTPUT and its errors
from all the ledgers in input order and audits them as one. A drain or Ctrl-C reaches the drivers as a stop:
each flushes its ledger and ends, and a rerun of the same command resumes every shard.
"""
from __future__ import annotations

import json
import multiprocessing
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from fleetgen.launcher.batch.dispatch import FIRST_ERRORS_SHOWN
from fleetgen.launcher.batch.finalise import finalise
from fleetgen.launcher.batch.ledger import Ledger
from fleetgen.launcher.batch.plan import BatchPlan, errors_path, summary_path
from fleetgen.launcher.batch.progress import Reporter, progress_path, write_json_atomically
from fleetgen.launcher.batch.runner import Drive, Summary, earlier_figures, write_summary
from fleetgen.launcher.errors import LaunchError

LOOK_EVERY_S = 0.2
STOP_GRACE_S = 30  # past batch.drain_timeout_s, how long a stopped driver gets before it is killed


def run_sharded(plan: BatchPlan, servers: list[str], token: Optional[str],
                drain: Optional[threading.Event]) -> Summary:
    shards, started = plan.shards, time.monotonic()
    if len(servers) < shards:
        raise LaunchError(f"batch.shards={shards}: only {len(servers)} server(s); each driver needs its own")
    finished_before = sum(_finished(plan, s) for s in range(shards)) == plan.items
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: this process has threads
    stop = context.Event()
    for s in range(shards):  # a driver's outcome is this run's or none
        _outcome_path(plan, s).unlink(missing_ok=True)
    drivers = {s: _start(context, plan, s, servers[s::shards], token, stop) for s in range(shards)}
    restarts, lost = dict.fromkeys(range(shards), 0), {}
    reporter = Reporter(progress_path(plan.output), lambda: _progress(plan, started), lambda: None)
    reporter.start()
    interrupted = None
    try:
        while drivers:
            if drain is not None and drain.is_set():
                stop.set()
            for s, driver in list(drivers.items()):
                if driver.exitcode is None:
                    continue
                del drivers[s]
                if driver.exitcode != 0 and not stop.is_set():
                    restarts[s] += 1
                    if restarts[s] <= plan.cfg.batch.max_retries:
                        print(f"launch: batch driver {s} of {shards} ended with exit code {driver.exitcode}; "
                              f"starting it again (it resumes from its ledger)", flush=True)
                        drivers[s] = _start(context, plan, s, servers[s::shards], token, stop)
                    else:
                        lost[s] = f"driver {s} ended with exit code {driver.exitcode}, {restarts[s]} times"
            time.sleep(LOOK_EVERY_S)
    except KeyboardInterrupt as e:
        interrupted = f"interrupted by {'SIGTERM' if 'signal 15' in str(e) else 'Ctrl-C'}"
        stop.set()
        _wait_for(drivers, plan.cfg.batch.drain_timeout_s + STOP_GRACE_S)
    ledgers = [plan.ledger(s) for s in range(shards)]
    complete = sum(_finished(plan, s) for s in range(shards)) == plan.items
    audit = finalise(ledgers, plan.output, errors_path(plan.output), plan.items, plan.cfg.batch.samples) \
        if complete else None
    reporter.stop()
    summary = _summary(plan, started, complete, audit, interrupted or ("; ".join(lost.values()) or None))
    if finished_before:  # nothing was generated now: the figures of the run that did it stand
        summary = earlier_figures(summary_path(plan.output), summary)
    write_summary(plan, summary)
    return summary


def _start(context, plan: BatchPlan, shard: int, servers: list[str], token: Optional[str], stop):
    driver = context.Process(target=_drive_shard, args=(plan, shard, servers, token, stop),
                             name=f"fleetgen-batch-shard-{shard}", daemon=True)
    driver.start()
    return driver


def _drive_shard(plan: BatchPlan, shard: int, servers: list[str], token: Optional[str], stop) -> None:
    """A driver's process: its shard through its servers, then its outcome for the launcher."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the launcher says stop
    drain = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), drain.set()), daemon=True).start()
    drive = Drive(plan, servers, token, shard)
    drive.run(drain)
    drive.reporter.stop()
    d = drive.dispatcher
    write_json_atomically(_outcome_path(plan, shard), {
        "stop_reason": d.stop_reason, "retried": d.retried, "completion_tokens_now": d.completion_tokens_now,
        "wall_s": time.monotonic() - drive.started, "first_errors": d.first_errors,
        "first_request_s": None if d.first_request_at is None else d.first_request_at - drive.started,
        "servers": [{"url": r.url, "state": r.state, "done": r.done, "completion_tokens": r.completion_tokens,
                     "reused_tokens": r.reused_tokens, "failures": r.failures, "reason": r.reason}
                    for r in d.replicas]})


def _outcome_path(plan: BatchPlan, shard: int) -> Path:
    return plan.output.with_name(f"{plan.output.name}.shard-{shard}-of-{plan.shards}.outcome.json")


def _wait_for(drivers: dict, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for driver in drivers.values():
        driver.join(max(0.0, deadline - time.monotonic()))
        if driver.exitcode is None:
            driver.kill()
            driver.join()


def _finished(plan: BatchPlan, shard: int) -> int:
    path = plan.ledger(shard)
    if not path.exists():
        return 0
    ledger = Ledger(path, plan.header, plan.cfg.batch.samples)
    ledger.close()
    return ledger.finished


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _progress(plan: BatchPlan, started: float) -> dict:
    """The drivers' progress files summed: what OUTPUT.progress.json and the bar show."""
    parts = [p for s in range(plan.shards) if (p := _read(progress_path(plan.output, s, plan.shards)))]
    total = {key: sum(p[key] for p in parts) for key in ("done", "failed", "retried", "prompt_tokens",
                                                          "prompt_tokens_reused", "completion_tokens", "tokens_per_s")}
    remaining = plan.items - total["done"] - total["failed"]
    etas = [p["eta_s"] for p in parts]
    return {"total": plan.items, **total, "tokens_per_s": round(total["tokens_per_s"], 1),
            "eta_s": max(etas) if etas and None not in etas else (0.0 if not remaining else None),
            "replicas": [r for p in parts for r in p["replicas"]], "complete": remaining == 0,
            "shards": len(parts), "updated": time.time()}


def _summary(plan: BatchPlan, started: float, complete: bool, audit, reason: Optional[str]) -> Summary:
    wall = time.monotonic() - started
    outcomes = [o for s in range(plan.shards) if (o := _read(_outcome_path(plan, s)))]
    counts = [Ledger(plan.ledger(s), plan.header, plan.cfg.batch.samples) for s in range(plan.shards)]
    for ledger in counts:
        ledger.close()
    servers = [{**r, "tokens_per_s": round(r["completion_tokens"] / wall, 1) if wall > 0 else 0.0}
               for o in outcomes for r in o["servers"]]
    firsts = [o["first_request_s"] for o in outcomes if o["first_request_s"] is not None]
    stops = [o["stop_reason"] for o in outcomes if o["stop_reason"]]
    return Summary(
        complete=complete, stop_reason=None if complete else reason or (stops[0] if stops else "interrupted"),
        records=plan.records, samples=plan.cfg.batch.samples, items=plan.items,
        done=sum(c.finished - c.failed for c in counts), failed=sum(c.failed for c in counts),
        retried=sum(o["retried"] for o in outcomes), prompt_tokens=sum(c.prompt_tokens for c in counts),
        prompt_tokens_reused=sum(c.reused_tokens for c in counts),
        completion_tokens=sum(c.completion_tokens for c in counts),
        tokens_per_s=round(sum(o["completion_tokens_now"] for o in outcomes) / wall, 1) if wall > 0 else 0.0,
        wall_s=round(wall, 2), first_request_s=round(min(firsts), 3) if firsts else None, servers=servers,
        lost_replicas=[{"url": r["url"], "reason": r["reason"]} for r in servers if r["failures"]],
        first_errors=[e for o in outcomes for e in o["first_errors"]][:FIRST_ERRORS_SHOWN],
        audit=audit.as_dict() if audit else None, output=str(plan.output), errors=str(errors_path(plan.output)),
        resume=None if complete else plan.command or None)
