"""What a job asks of Slurm or of this machine: submitit's parameters, built from the composed config.

Everything here is a pure function of the config except make_executor; render_sbatch gives the exact script
submitit submits, for `launch --dry-run` and for golden tests.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import sys
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import submitit
from submitit.local.local import LocalExecutor
from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

from fleetgen.conf.schema import Cluster, LaunchConfig
from fleetgen.slurm.container import (container_python, container_srun_args, mount_folder,  # noqa: F401 (API)
                                      planned_overlay, prepare_container, read_only_paths)

CONTROLLER_LOG = "local_controller.log"  # in the jobs folder: what submitit's local job controllers print
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _setup_lines(cluster: Cluster) -> list[str]:
    lines = list(cluster.setup)
    for name, value in cluster.env.items():
        if not _ENV_NAME.fullmatch(str(name)):
            raise ValueError(f"cluster.env.{name}: not a valid environment variable name")
        lines.append(f"export {name}={shlex.quote(str(value))}")
    return lines


def executor_parameters(cfg: LaunchConfig, job_folder: Path | str, overlay: Path | None = None) -> dict:
    """The keyword arguments of submitit's `executor.update_parameters(...)`, None values left out.

    overlay: the folder container.overlay prepared for the image (slurm/container_overlay.py), if any."""
    cluster = cfg.cluster
    common = {"tasks_per_node": cfg.ranks_per_node, "timeout_min": cluster.time_min, "name": cfg.job.name}
    if cluster.kind == "local":
        return {**common, "nodes": 1, **_local_gpus(cluster)}
    container_args = container_srun_args(cfg.container, job_folder, read_only_paths(cfg, overlay))
    params = {
        "slurm_partition": cluster.partition,
        "slurm_account": cluster.account,
        "slurm_qos": cluster.qos,
        "nodes": cfg.parallel.nodes,
        **common,
        "gpus_per_node": cluster.gpus_per_node or None,  # CPU ranks: no GPU request at all
        "cpus_per_task": cluster.cpus_per_task,
        "mem_gb": cluster.mem_gb,
        "slurm_exclusive": True if cluster.exclusive else None,  # submitit would write --exclusive=False
        "slurm_constraint": cluster.constraint,
        "slurm_setup": _setup_lines(cluster) or None,
        "slurm_additional_parameters": dict(cluster.sbatch_args) or None,
        # a detached job's tasks exit non-zero only when its driver fails the job: then end every task
        "slurm_srun_args": [*cluster.srun_args, *(["--kill-on-bad-exit=1"] if cfg.detach else []), *container_args]
        or None,
        "slurm_signal_delay_s": signal_delay_s(cfg),
    }
    return {key: value for key, value in params.items() if value is not None}


def _local_gpus(cluster: Cluster) -> dict:
    """The local executor sets the job's CUDA_VISIBLE_DEVICES to the first gpus_per_node of visible_gpus (of
    0, 1, ... without them), replacing the launcher's own, and to "" (no GPU) unless asked for some: so rank k,
    which drives cuda:k, runs on visible_gpus[k]."""
    if cluster.gpus_per_node is None:
        raise ValueError("cluster.gpus_per_node is null: the launcher settles it for this machine "
                         "(launcher/validate.py place_local_ranks) before submission")
    if not cluster.gpus_per_node:
        return {}
    names = {"visible_gpus": tuple(cluster.visible_gpus)} if cluster.visible_gpus is not None else {}
    return {"gpus_per_node": cluster.gpus_per_node, **names}


def signal_delay_s(cfg: LaunchConfig) -> int:
    """How long before the time limit Slurm sends USR2. Rank 0 unwinds as after a shutdown request, with the
    same grace; a detached job first drains its batch (in-flight items get batch.drain_timeout_s), then requeues."""
    drain = cfg.batch.drain_timeout_s if cfg.detach else 0
    return max(1, math.ceil(cfg.job.grace_period_s + drain))


def make_executor(cfg: LaunchConfig, job_folder: Path | str) -> submitit.Executor:
    """submitit's executor for cluster.kind ("slurm" or "local"), with every parameter set.

    With a container image this is the moment of submission: the image is probed where the runtime allows and
    the overlay of what it lacks is built or reused (slurm/container.py), so a bad image fails here."""
    if cfg.cluster.kind == "local":
        executor = FleetgenLocalExecutor(folder=job_folder, max_num_timeout=cfg.job.max_requeues)
        executor.update_parameters(**executor_parameters(cfg, job_folder))
        return executor
    overlay = prepare_container(cfg, job_folder)
    python = container_python(cfg, job_folder, overlay)
    # Requeues after a time limit, counted by submitit's checkpoint mechanism (a detached job is checkpointable).
    executor = submitit.AutoExecutor(folder=job_folder, cluster="slurm", slurm_max_num_timeout=cfg.job.max_requeues,
                                     **({"slurm_python": python} if python else {}))
    executor.update_parameters(**executor_parameters(cfg, job_folder, overlay))
    return executor


class FleetgenLocalExecutor(LocalExecutor):
    """submitit's local executor, changed twice.

    Its job controller writes to the jobs folder instead of the terminal: submitit starts the controller in the
    caller's process group, so a Ctrl-C at the terminal reaches it as well as `launch`, and it dies with a
    KeyboardInterrupt traceback: in CONTROLLER_LOG, not on the user's screen. (The ranks write to their own log
    files already.)

    And visible_gpus may name GPUs by UUID (GPU-..., MIG-...) as well as by index: submitit refuses all but
    integers, though it only joins them into CUDA_VISIBLE_DEVICES, which takes either."""

    def _internal_update_parameters(self, **kwargs) -> None:
        names = kwargs.pop("visible_gpus", None)
        super()._internal_update_parameters(**kwargs)
        if names is not None:
            if len(names) < self.parameters.get("gpus_per_node", 0):
                raise ValueError(f"{self.parameters['gpus_per_node']} GPUs asked for, but visible_gpus={names}")
            self.parameters["visible_gpus"] = tuple(names)

    def _submit_command(self, command: str):
        with _output_to(mount_folder(self.folder) / CONTROLLER_LOG):
            return super()._submit_command(command)


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr, the descriptors a child inherits, appended to path meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        for fd, saved_fd in zip((1, 2), saved):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


def render_sbatch(cfg: LaunchConfig, job_folder: Path | str) -> str:
    """The sbatch script make_executor(cfg, job_folder) submits, made by submitit's own function.

    Needs no Slurm on this machine (a SlurmExecutor refuses to exist without srun), so the AutoExecutor's
    renaming of shared parameters (timeout_min -> time, ...) is repeated here; the real-cluster test checks
    the result against the script submitit writes.
    """
    folder = Path(job_folder).expanduser().absolute()
    overlay = planned_overlay(cfg)
    renames = SlurmExecutor._equivalence_dict()
    sbatch = {key.removeprefix("slurm_") if key.startswith("slurm_") else renames[key]: value
              for key, value in executor_parameters(cfg, folder, overlay).items()}
    if "mem" in sbatch:
        sbatch["mem"] = _convert_mem(sbatch["mem"])
    python = container_python(cfg, folder, overlay) or shlex.quote(sys.executable)
    # As SlurmExecutor._submitit_command_str: the task runs the function pickled in the job folder.
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **sbatch)
