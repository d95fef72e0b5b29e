"""`launch status|logs|cancel`: follow and steer a job, detached or attended by a launcher, from any shell, from its
folder alone."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from fleetgen.conf.schema import Job
from fleetgen.launcher.batch.plan import summary_path
from fleetgen.launcher.batch.progress import progress_path
from fleetgen.launcher import owner
from fleetgen.launcher.errors import LaunchError
from fleetgen.launcher.jobrecord import find_job, read_history, read_record, server_urls
from fleetgen.slurm.job_folder import CANCEL_REQUEST, DRIVER_LOG, JobPaths, write_atomically
from fleetgen.slurm.job_control import control_class

COMMANDS = ("status", "logs", "cancel")
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING")
POLL_S = 1.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"launch {argv[0]}")
    parser.add_argument("job", nargs="?", help="a job id or job folder (default: the latest job of --folder)")
    parser.add_argument("--folder", default=Job().folder, help="job.folder the job was submitted with "
                        "(default: %(default)s)")
    if argv[0] == "status":
        parser.add_argument("--json", action="store_true", help="print the status as JSON")
    if argv[0] == "logs":
        parser.add_argument("--rank", type=int, help="show this rank's log instead of the batch driver's (a job "
                            "without a driver, one a launcher attends, shows rank 0's)")
        parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    args = parser.parse_args(argv[1:])
    job_folder = find_job(args.job, Path(args.folder))
    if argv[0] == "status":
        report = status(job_folder)
        print(json.dumps(report, indent=1) if args.json else describe(report))
        return 0
    if argv[0] == "logs":
        return logs(job_folder, args.rank, args.follow)
    return cancel(job_folder)


# ---- the job's state, wherever it runs

def job_state(record: dict, history: list[dict]) -> str:
    """The scheduler's state; for a local job that has ended, what its driver last recorded."""
    state = control_class(record["kind"]).state_of(record["job_id"])
    if state is not None:
        return state
    if record.get("owner"):  # attended: its launcher tore it down, or was killed and left it to be reaped
        return "ENDED" if record.get("ended") else "ENDED (its launcher did not record how)"
    last = history[-1]["event"] if history else ""
    return {"finished": "COMPLETED", "cancelled": "CANCELLED"}.get(last, "FAILED")


def _active(state: str) -> bool:
    return state.split()[0] in ACTIVE_STATES


# ---- status

def status(job_folder: Path) -> dict:
    record, history = read_record(job_folder), read_history(job_folder)
    output = Path(record["output"]) if record.get("output") else None
    progress = _read_json(progress_path(output)) if output else None
    summary = _read_json(summary_path(output)) if output else None
    state = job_state(record, history)
    counts = progress or summary or {}
    replicas = progress.get("replicas", []) if progress else []
    starts = [event for event in history if event["event"] == "started"]
    return {
        "job_id": record["job_id"], "kind": record["kind"], "recipe": record["recipe"],
        "job_folder": str(job_folder), "state": state, "mode": record.get("mode", "batch"),
        "attended_by": owner.describe(record["owner"]) if record.get("owner") else None,
        "servers": server_urls(job_folder, record.get("replicas", 1)) if _active(state) else [],
        **{key: counts.get(key) for key in ("total", "done", "failed", "retried", "tokens_per_s", "eta_s")},
        "complete": bool(summary and summary["complete"]),  # the output written and audited
        "replicas": replicas,
        "healthy_replicas": sum(r.get("state") == "healthy" for r in replicas),
        "lost_replicas": [r for r in replicas if r.get("state") == "failed"],
        "requeues": max(len(starts) - 1, 0),  # each start after the first: drained and requeued, or killed
        "history": history,
        "output": str(output) if output and output.exists() else None,
        "summary": str(summary_path(output)) if summary else None,
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def describe(report: dict) -> str:
    def known(value, fmt="{}"):
        return "?" if value is None else fmt.format(value)

    details = [report["kind"], f"recipe {report['recipe']}"]
    if report.get("attended_by"):  # a detached job is always a batch, and attends itself
        details += [report["mode"], f"attended by launch {report['attended_by']}"]
    lines = [f"job {report['job_id']} ({', '.join(details)}): {report['state']}"]
    if report["servers"]:
        lines.append(f"  serving at {' '.join(report['servers'])}")
    if report["total"] is not None:
        eta = f"; ETA {_duration(report['eta_s'])}" if _active(report["state"]) and not report["complete"] else ""
        lines.append(f"  items: {known(report['done'])}/{known(report['total'])} done, {known(report['failed'])} "
                     f"failed, {known(report['retried'])} retried; {known(report['tokens_per_s'], '{:.1f}')} "
                     f"tokens/s{eta}" + ("; complete" if report["complete"] else ""))
    if report["replicas"]:
        lines.append(f"  replicas: {report['healthy_replicas']}/{len(report['replicas'])} healthy")
        lines += [f"    lost: {r.get('url')}: {r.get('reason')}" for r in report["lost_replicas"]]
    if report["history"]:
        lines.append(f"  requeues: {report['requeues']}")
        lines += [f"    {_clock(event['time'])} {_event_text(event)}" for event in report["history"]]
    if report["output"] or report["summary"]:
        lines.append("  " + ", ".join(f"{name}: {report[name]}" for name in ("output", "summary") if report[name]))
    lines.append(f"  logs: launch logs {report['job_folder']} [--rank N] [-f]")
    return "\n".join(lines)


def _event_text(event: dict) -> str:
    details = {k: v for k, v in event.items() if k not in ("event", "time")}
    return event["event"] + (" (" + ", ".join(f"{k} {v}" for k, v in details.items()) + ")" if details else "")


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# ---- logs

def logs(job_folder: Path, rank: int | None, follow: bool) -> int:
    record = read_record(job_folder)
    if rank is None and ((job_folder / DRIVER_LOG).exists() or not record.get("owner")):
        paths = [job_folder / DRIVER_LOG]
    else:
        rank = rank or 0
        paths = [JobPaths(job_folder).rank_log(record["job_id"], rank, kind) for kind in ("out", "err")]
        if not any(path.exists() for path in paths):
            raise LaunchError(f"no log of rank {rank} in {job_folder} (yet)")
    offsets = dict.fromkeys(paths, 0)
    while True:
        active = follow and _active(job_state(record, read_history(job_folder)))
        for path in paths:
            offsets[path] = _print_from(path, offsets[path])
        if not active:
            return 0
        time.sleep(POLL_S)


def _print_from(path: Path, offset: int) -> int:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            chunk = log.read()
    except FileNotFoundError:
        return offset
    sys.stdout.write(chunk.decode(errors="replace"))
    sys.stdout.flush()
    return offset + len(chunk)


# ---- cancel

def cancel(job_folder: Path) -> int:
    """Ask the driver to drain (it then cancels its own job); cancel from here if it has not by the deadline."""
    record = read_record(job_folder)
    state = job_state(record, read_history(job_folder))
    if not _active(state):
        print(f"job {record['job_id']} has already ended: {state}")
        return 0
    if record.get("owner"):
        return _cancel_attended(record, job_folder)
    write_atomically(job_folder / CANCEL_REQUEST, str(time.time()))
    drained = state.startswith("RUNNING") and _ended_within(record, job_folder, record["grace_period_s"] + 60)
    if not drained:
        control_class(record["kind"]).cancel_id(record["job_id"])
        if not _ended_within(record, job_folder, 60):
            raise LaunchError(f"job {record['job_id']} did not end after it was cancelled; check "
                              f"`squeue -j {record['job_id']}`")
    done = [e for e in read_history(job_folder) if e["event"] == "cancelled"]
    how = f"drained ({_event_text(done[-1])})" if done else "cancelled without draining (it was not running)"
    print(f"job {record['job_id']}: {how}; state {job_state(record, read_history(job_folder))}")
    return 0


def _cancel_attended(record: dict, job_folder: Path) -> int:
    """A launcher on this host is asked to tear its job down, as SIGTERM asks it (a batch writes its summary);
    a job whose launcher is elsewhere or gone is cancelled through the scheduler."""
    who = record["owner"]
    if owner.is_alive_here(who):
        os.kill(who["pid"], signal.SIGTERM)
        how = f"its launcher ({owner.describe(who)}) tore it down"
    else:
        control_class(record["kind"]).cancel_id(record["job_id"])
        how = "cancelled through the scheduler"
    if not _ended_within(record, job_folder, record["grace_period_s"] + 60):
        raise LaunchError(f"job {record['job_id']} did not end after it was cancelled; check "
                          f"`squeue -j {record['job_id']}`")
    print(f"job {record['job_id']}: {how}; state {job_state(read_record(job_folder), [])}")
    return 0


def _ended_within(record: dict, job_folder: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _active(job_state(record, read_history(job_folder))):
            return True
        time.sleep(POLL_S)
    return False
