"""Durable batch generation: `plan = prepare(cfg)` before submission, `summary = run(plan, servers, token)`
once the servers are healthy. Every (record key, sample) is generated exactly once across interruptions."""
from fleetgen.launcher.batch.plan import BatchPlan, prepare
from fleetgen.launcher.batch.progress import report
from fleetgen.launcher.batch.runner import Summary, run

__all__ = ["BatchPlan", "Summary", "prepare", "report", "run"]
