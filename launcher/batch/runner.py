"""run(): the batch through the servers into the ledger, then the final output, its audit and the summary."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

from fleetgen.launcher.batch.dispatch import Dispatcher
from fleetgen.launcher.batch.finalise import finalise
from fleetgen.launcher.batch.inputs import records
from fleetgen.launcher.batch.ledger import Ledger
from fleetgen.launcher.batch.outputlock import lock_output
from fleetgen.launcher.batch.plan import BatchPlan, errors_path, summary_path
from fleetgen.launcher.batch.progress import Reporter, progress_path, write_json_atomically
from fleetgen.launcher.batch.source import WorkSource
from fleetgen.launcher.errors import LaunchError


@dataclass
class Summary:
    """What a run did. complete: every item is finished and OUTPUT is written and audited (audit["ok"]);
    otherwise stop_reason says why it stopped (drained, aborted, every server lost, a refused token) and a
    rerun of the same command resumes from the ledger. Counts are over the whole batch (earlier runs
    included): done = items generated, failed = items in the errors file; tokens_per_s and retried are this
    run's. prompt_tokens_reused: prompt tokens the servers found in their KV cache (model.prefix_caching: a shared
    system prompt, the other samples of a record), not computed; prompt_tokens less it were computed. Also
    written to OUTPUT.summary.json with fleetgen's version and the resolved config."""
    complete: bool
    stop_reason: Optional[str]
    records: int
    samples: int
    items: int
    done: int
    failed: int
    retried: int
    prompt_tokens: int
    prompt_tokens_reused: int
    completion_tokens: int
    tokens_per_s: float
    wall_s: float
    first_request_s: Optional[float]
    servers: list[dict] = field(default_factory=list)
    lost_replicas: list[dict] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)
    audit: Optional[dict] = None
    output: str = ""
    errors: str = ""
    resume: Optional[str] = None  # when not complete: the command that resumes the batch


def run(plan: BatchPlan, servers: list[str], token: Optional[str],
        drain: Optional[threading.Event] = None) -> Summary:
    """Drive the batch through `servers` (base URLs, one per replica), sending `Authorization: Bearer
    <token>` when a token is given. Finished items go to OUTPUT.ledger.jsonl as they arrive; items already
    there are skipped. OUTPUT.progress.json is rewritten every ~2 s and at the end: {"total", "done",
    "failed", "retried", "prompt_tokens", "prompt_tokens_reused", "completion_tokens", "tokens_per_s", "eta_s",
    "replicas": [{"url",
    "state": "healthy"|"failed", "outstanding", "done", "reason"}], "complete", "updated"}. When `drain` is
    set, no item is admitted any more, those in flight get batch.drain_timeout_s to finish, the ledger is
    flushed and fsynced and the Summary says complete=False (a rerun finishes). When every item is
    finished, OUTPUT and OUTPUT.errors.jsonl are written in input order, audited, and OUTPUT.summary.json
    is written. Ctrl-C (KeyboardInterrupt) stops the run the same way, with a summary. OUTPUT's lock is held
    throughout: another run on the same output is refused."""
    if not servers:
        raise LaunchError("batch: no server to send the batch to")
    with lock_output(plan.output):
        if plan.shards > 1:
            from fleetgen.launcher.batch.shards import run_sharded

            return run_sharded(plan, servers, token, drain)
        return _run(plan, servers, token, drain)


class Drive:
    """One driver's run over its records (all of them, or a shard's): dispatch into its ledger, with its
    progress file, until every item of its own is finished or it stops."""

    def __init__(self, plan: BatchPlan, servers: list[str], token: Optional[str], shard: int = 0):
        cfg, self.plan, self.started = plan.cfg, plan, time.monotonic()
        fmt = plan.make_format()
        self.items = plan.shard_items(shard)
        self.ledger = Ledger(plan.ledger(shard), plan.header, cfg.batch.samples)
        source = WorkSource(records(plan.input, fmt, shard, plan.shards), fmt, cfg.batch.samples, self.ledger.done,
                            cfg.batch.prompts_per_request)
        self.dispatcher = Dispatcher(source, fmt, self.ledger, servers, token, cfg.batch, cfg.recipe, self.items)
        shown = None if plan.shards == 1 else shard
        self.reporter = Reporter(progress_path(plan.output, shown, plan.shards), self.snapshot, self.ledger.sync,
                                 show=plan.shards == 1)
        self.interrupted: Optional[str] = None

    def run(self, drain: Optional[threading.Event]) -> bool:
        """Whether every item of this driver's is finished."""
        self.reporter.start()
        try:
            self.dispatcher.run(drain)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (launcher/job.py): stop here, as a drain would
            self.interrupted = f"interrupted by {'SIGTERM' if 'signal 15' in str(e) else 'Ctrl-C'}"
        finally:
            self.ledger.close()
        return self.ledger.finished == self.items

    def snapshot(self) -> dict:
        return _snapshot(self.items, self.ledger, self.dispatcher, self.started)


def _run(plan: BatchPlan, servers: list[str], token: Optional[str], drain: Optional[threading.Event]) -> Summary:
    cfg, output = plan.cfg, plan.output
    drive = Drive(plan, servers, token)
    rerun_of_finished = drive.ledger.finished == plan.items
    complete = drive.run(drain)
    audit = finalise([drive.ledger.path], output, errors_path(output), plan.items, cfg.batch.samples) \
        if complete else None
    drive.reporter.stop()
    summary = _summary(plan, drive.ledger, drive.dispatcher, drive.started, complete, audit, drive.interrupted)
    if rerun_of_finished:  # nothing was generated now: the figures of the run that did it stand
        summary = earlier_figures(summary_path(output), summary)
    write_summary(plan, summary)
    return summary


def write_summary(plan: BatchPlan, summary: Summary) -> None:
    write_json_atomically(summary_path(plan.output), {**asdict(summary), "fleetgen_version": _version(),
                                                      "config": _shown_config(plan)})


def earlier_figures(path, summary: Summary) -> Summary:
    """The earlier complete run's summary with this run's audit (the files were written again)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return summary
    if not earlier.get("complete"):
        return summary
    names = {f.name for f in fields(Summary)}
    return Summary(**{"prompt_tokens_reused": 0,  # a summary older than the count
                      **{k: v for k, v in earlier.items() if k in names}, "audit": summary.audit})


def _snapshot(items: int, ledger: Ledger, dispatcher: Dispatcher, started: float) -> dict:
    elapsed = time.monotonic() - started
    remaining = items - ledger.finished
    rate = dispatcher.done_now / elapsed if elapsed > 0 else 0.0
    return {"total": items, "done": ledger.finished - ledger.failed, "failed": ledger.failed,
            "retried": dispatcher.retried, "prompt_tokens": ledger.prompt_tokens,
            "prompt_tokens_reused": ledger.reused_tokens, "completion_tokens": ledger.completion_tokens,
            "tokens_per_s": round(dispatcher.completion_tokens_now / elapsed, 1) if elapsed > 0 else 0.0,
            "eta_s": round(remaining / rate, 1) if rate > 0 else (0.0 if not remaining else None),
            "replicas": [{"url": r.url, "state": r.state, "outstanding": r.outstanding, "done": r.done,
                          "reason": r.reason} for r in dispatcher.replicas],
            "complete": remaining == 0, "updated": time.time()}


def _summary(plan: BatchPlan, ledger: Ledger, dispatcher: Dispatcher, started: float, complete: bool,
             audit, interrupted: Optional[str]) -> Summary:
    wall = time.monotonic() - started
    servers = [{"url": r.url, "state": r.state, "done": r.done, "completion_tokens": r.completion_tokens,
                "reused_tokens": r.reused_tokens,
                "tokens_per_s": round(r.completion_tokens / wall, 1) if wall > 0 else 0.0, "failures": r.failures,
                "reason": r.reason} for r in dispatcher.replicas]
    first = dispatcher.first_request_at
    return Summary(
        complete=complete,
        stop_reason=None if complete else interrupted or dispatcher.stop_reason or "interrupted",
        records=plan.records, samples=plan.cfg.batch.samples, items=plan.items,
        done=ledger.finished - ledger.failed, failed=ledger.failed, retried=dispatcher.retried,
        prompt_tokens=ledger.prompt_tokens, prompt_tokens_reused=ledger.reused_tokens,
        completion_tokens=ledger.completion_tokens,
        tokens_per_s=round(dispatcher.completion_tokens_now / wall, 1) if wall > 0 else 0.0, wall_s=round(wall, 2),
        first_request_s=None if first is None else round(first - started, 3), servers=servers,
        lost_replicas=[{"url": s["url"], "reason": s["reason"]} for s in servers if s["failures"]],
        first_errors=dispatcher.first_errors, audit=audit.as_dict() if audit else None,
        output=str(plan.output), errors=str(errors_path(plan.output)),
        resume=None if complete else plan.command or None)


def _shown_config(plan: BatchPlan) -> dict:
    config = plan.cfg.model_dump()
    if config["server"].get("api_key"):
        config["server"]["api_key"] = "(set)"
    return config


def _version() -> str:
    try:
        return version("fleetgen")
    except PackageNotFoundError:
        return "unknown"
