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


def _rank_main(rank: int, world_size: int, workdir: str, fn, args) -> None:
    out = Path(workdir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=300))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # the parent re-raises it with the rank's traceback
        result = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out.write_bytes(pickle.dumps(result))


def run_ranks(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, *args) on world_size processes; returns each rank's result, rank order.

    fn must be importable (a module-level function) and its results picklable.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks on 2 cores: one thread each
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(_rank_main, args=(world_size, workdir, fn, args), nprocs=world_size,
                           join=True, start_method="spawn")
        results = []
        for rank in range(world_size):
            status, value = pickle.loads((Path(workdir) / f"rank{rank}.pkl").read_bytes())
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results


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
