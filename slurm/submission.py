"""What a job asks of Slurm or of this machine: submitit's parameters, built from the composed config.

Everything here is a pure function of the config except make_executor; render_sbatch gives the exact script
submitit submits, for `launch --dry-run` and for golden tests.
"""
from __future__ import annotations

import math
import re
import shlex
import sys
from pathlib import Path

import submitit
from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

from fleetgen.conf.schema import Cluster, Container, LaunchConfig

CONTAINER_PYTHON = "python3"  # the image's interpreter: the login node's path means nothing inside it
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def mount_folder(job_folder: Path | str) -> Path:
    """The job folder without its submitit placeholders (folder/%j): what exists before the job starts."""
    folder = Path(job_folder).expanduser().absolute()
    while "%" in folder.as_posix():
        folder = folder.parent
    return folder


def container_srun_args(container: Container, job_folder: Path | str) -> list[str]:
    """pyxis/enroot flags for srun; [] without an image. The job folder is always mounted (same path inside),
    so ranks can write the server address, rendezvous file and results where the launcher reads them."""
    if not container.image:
        return []
    folder = str(mount_folder(job_folder))
    mounts = list(container.mounts)
    for i, mount in enumerate(mounts):
        if not mount or "," in mount:
            raise ValueError(f"container.mounts[{i}]={mount!r}: expected HOST_PATH[:CONTAINER_PATH[:ro]] "
                             "without commas")
    if f"{folder}:{folder}" not in mounts:
        mounts.append(f"{folder}:{folder}")
    args = [f"--container-image={container.image}", f"--container-mounts={','.join(mounts)}",
            f"--container-workdir={container.workdir or folder}"]
    if not container.mount_home:
        args.append("--no-container-mount-home")
    return args


def _setup_lines(cluster: Cluster) -> list[str]:
    lines = list(cluster.setup)
    for name, value in cluster.env.items():
        if not _ENV_NAME.fullmatch(str(name)):
            raise ValueError(f"cluster.env.{name}: not a valid environment variable name")
        lines.append(f"export {name}={shlex.quote(str(value))}")
    return lines


def executor_parameters(cfg: LaunchConfig, job_folder: Path | str) -> dict:
    """The keyword arguments of submitit's `executor.update_parameters(...)`, None values left out."""
    cluster = cfg.cluster
    common = {"tasks_per_node": cfg.ranks_per_node, "timeout_min": cluster.time_min, "name": cfg.job.name}
    if cluster.kind == "local":
        # The local executor hides every GPU (CUDA_VISIBLE_DEVICES="") unless asked for some.
        gpus = {"gpus_per_node": cluster.gpus_per_node} if cluster.gpus_per_node else {}
        return {**common, "nodes": 1, **gpus}
    container_args = container_srun_args(cfg.container, job_folder)
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
        "slurm_srun_args": [*cluster.srun_args, *container_args, *(["--kill-on-bad-exit=1"] if cfg.detach else [])]
        or None,
        "slurm_signal_delay_s": signal_delay_s(cfg),
    }
    return {key: value for key, value in params.items() if value is not None}


def signal_delay_s(cfg: LaunchConfig) -> int:
    """How long before the time limit Slurm sends USR2. Rank 0 unwinds as after a shutdown request, with the
    same grace; a detached job first drains its batch (in-flight items get batch.drain_timeout_s), then requeues."""
    drain = cfg.batch.drain_timeout_s if cfg.detach else 0
    return max(1, math.ceil(cfg.job.grace_period_s + drain))


def _python(cfg: LaunchConfig) -> str | None:
    return CONTAINER_PYTHON if cfg.cluster.kind == "slurm" and cfg.container.image else None


def make_executor(cfg: LaunchConfig, job_folder: Path | str) -> submitit.Executor:
    """submitit's executor for cluster.kind ("slurm" or "local"), with every parameter set."""
    python = _python(cfg)
    kind = cfg.cluster.kind
    # Requeues after a time limit, counted by submitit's checkpoint mechanism (a detached job is checkpointable).
    executor = submitit.AutoExecutor(folder=job_folder, cluster=kind,
                                     **{f"{kind}_max_num_timeout": cfg.job.max_requeues},
                                     **({"slurm_python": python} if python else {}))
    executor.update_parameters(**executor_parameters(cfg, job_folder))
    return executor


def render_sbatch(cfg: LaunchConfig, job_folder: Path | str) -> str:
    """The sbatch script make_executor(cfg, job_folder) submits, made by submitit's own function.

    Needs no Slurm on this machine (a SlurmExecutor refuses to exist without srun), so the AutoExecutor's
    renaming of shared parameters (timeout_min -> time, ...) is repeated here; the real-cluster test checks
    the result against the script submitit writes.
    """
    folder = Path(job_folder).expanduser().absolute()
    renames = SlurmExecutor._equivalence_dict()
    sbatch = {key.removeprefix("slurm_") if key.startswith("slurm_") else renames[key]: value
              for key, value in executor_parameters(cfg, folder).items()}
    if "mem" in sbatch:
        sbatch["mem"] = _convert_mem(sbatch["mem"])
    python = _python(cfg) or shlex.quote(sys.executable)
    # As SlurmExecutor._submitit_command_str: the task runs the function pickled in the job folder.
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **sbatch)
