"""Run a function on N real processes joined by torch.distributed (gloo), as the ranks of a job would be; a
rank's coordinates without processes; waiting for a real submitit job."""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import psutil
import submitit
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fleetgen.model.parallel import ParallelState

CPU = torch.device("cpu")
JOB_TIMEOUT_S = 120
RANKS_TIMEOUT_S = 300  # as the ranks' gloo timeout
FAILURE_GRACE_S = 2.0  # after a rank fails, how long its peers' failures are gathered (they follow)


def _rank_main(rank: int, world_size: int, workdir: str, fn, args) -> None:
    out = Path(workdir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=300))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # the parent re-raises it with the rank's traceback
        result = ("error", traceback.format_exc())
    # written before the group is torn down, which may wait on peers; renamed, so never read half-written
    out.with_suffix(".tmp").write_bytes(pickle.dumps(result))
    out.with_suffix(".tmp").rename(out)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout_s: float = RANKS_TIMEOUT_S) -> list:
    """fn(rank, world_size, *args) on world_size processes; returns each rank's result, rank order.

    The first rank to fail (an exception, or an exit without a result) fails the call at once with its
    traceback, and the other ranks, likely blocked in a collective with it, are killed. fn must be importable
    (a module-level function) and its results picklable.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks on 2 cores: one thread each
    with tempfile.TemporaryDirectory() as workdir:
        context = mp.start_processes(_rank_main, args=(world_size, workdir, fn, args), nprocs=world_size,
                                     join=False, start_method="spawn")
        try:
            return _collect(context.processes, Path(workdir), time.monotonic() + timeout_s)
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()


def _collect(processes: list, workdir: Path, deadline: float) -> list:
    results: dict[int, object] = {}
    failed_at = None
    failures: list[tuple[int, int, str]] = []  # (order, rank, story): a death first, then by time written
    while len(results) + len(failures) < len(processes):
        for rank, process in enumerate(processes):
            if rank in results or rank in [f[1] for f in failures]:
                continue
            exited = process.exitcode is not None  # read before the file: a result is written before the exit
            path = workdir / f"rank{rank}.pkl"
            if path.exists():
                status, value = pickle.loads(path.read_bytes())
                if status == "ok":
                    results[rank] = value
                else:
                    failures.append((path.stat().st_mtime_ns, rank, f"rank {rank} failed:\n{value}"))
            elif exited:
                failures.append((0, rank, f"rank {rank} exited with code {process.exitcode} and no result"))
        if failures and failed_at is None:
            failed_at = time.monotonic()
        if failures and time.monotonic() > failed_at + FAILURE_GRACE_S:
            break  # the others are still blocked, on the failed rank most likely
        if time.monotonic() > deadline:
            missing = sorted(set(range(len(processes))) - set(results))
            raise AssertionError(f"ranks {missing} gave no result in time")
        time.sleep(0.05)
    if failures:
        # a rank's failure breaks its peers' collectives: its own story comes first, theirs after
        raise AssertionError("\n".join(story for _, _, story in sorted(failures)))
    return [results[rank] for rank in range(len(processes))]


def our_processes(marker: str) -> list[psutil.Process]:
    """The processes whose command line holds marker (a test's tmp_path): what a test started and left."""
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def wait_for_results(job: submitit.Job, timeout_s: float = JOB_TIMEOUT_S) -> list:
    """Every task's result; a job still pending or running after timeout_s fails the test (and is cancelled
    by the caller's finally)."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        assert time.monotonic() < deadline, f"job {job.job_id} not done after {timeout_s} s: {job.state}"
        time.sleep(0.5)
    return job.results()


def rank_coordinates(tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> ParallelState:
    """A rank's coordinates without processes: enough for shapes and plans, never for collectives."""
    return ParallelState(world_rank=pp_rank * tp_size + tp_rank, replica=0, tp_rank=tp_rank, tp_size=tp_size,
                         pp_rank=pp_rank, pp_size=pp_size, tp_group=None, pp_group=None, replica_group=None,
                         replica_ranks=tuple(range(tp_size * pp_size)), device=CPU, backend="gloo")
