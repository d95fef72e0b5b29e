"""Who this process is within its job: the one place in fleetgen that reads the job's environment."""
from __future__ import annotations

import os
from dataclasses import dataclass

import submitit

LOCAL_HOST = "127.0.0.1"  # submitit's local executor runs every rank on this machine


@dataclass(frozen=True)
class RankEnvironment:
    global_rank: int
    local_rank: int             # rank on this node: the GPU this rank drives
    world_size: int
    node_rank: int
    num_nodes: int
    hostnames: tuple[str, ...]  # Slurm: the allocation's nodes in node_rank order; otherwise the one known host
    job_id: str                 # shared by every rank of the job
    first_host: str             # the first node of the allocation, where rank 0 runs
    cluster: str                # "slurm" | "local" (submitit's executors) | "torchrun" (a plain process)
    restart_count: int = 0      # how often this job id was started before (Slurm requeue, torchrun restart)

    @classmethod
    def detect(cls) -> RankEnvironment:
        """Read submitit's job environment, or torchrun's variables when not started by submitit."""
        try:
            job = submitit.JobEnvironment()
        except RuntimeError:  # submitit raises when no executor started this process
            return cls._from_torchrun()
        return cls._from_submitit(job)

    @classmethod
    def _from_submitit(cls, job: submitit.JobEnvironment) -> RankEnvironment:
        # Slurm: SLURM_JOB_NODELIST expanded (node[1-2] -> node1, node2). Local: every rank is on this machine.
        hostnames = tuple(job.hostnames) if job.cluster == "slurm" else (LOCAL_HOST,)
        if len(hostnames) != job.num_nodes:
            raise RuntimeError(f"the job's node list {hostnames} does not have SLURM_JOB_NUM_NODES="
                               f"{job.num_nodes} entries")
        return cls(global_rank=job.global_rank, local_rank=job.local_rank, world_size=job.num_tasks,
                   node_rank=job.node, num_nodes=job.num_nodes, hostnames=hostnames, job_id=str(job.job_id),
                   first_host=hostnames[0], cluster=job.cluster,
                   restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))

    @classmethod
    def _from_torchrun(cls) -> RankEnvironment:
        """torchrun's variables; a process started by hand is rank 0 of a world of 1."""
        env = os.environ
        world_size = int(env.get("WORLD_SIZE", 1))
        global_rank = int(env.get("RANK", 0))
        per_node = int(env.get("LOCAL_WORLD_SIZE", world_size))
        host = env.get("MASTER_ADDR", LOCAL_HOST)
        return cls(global_rank=global_rank, local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world_size,
                   node_rank=int(env.get("GROUP_RANK", global_rank // per_node)),
                   num_nodes=-(-world_size // per_node), hostnames=(host,), job_id=_torchrun_job_id(env),
                   first_host=host, cluster="torchrun",
                   restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))


def _torchrun_job_id(env) -> str:
    """torchrun's run id (its default is the literal "none"); the master port tells runs apart without one."""
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return run_id
    if "MASTER_PORT" in env:
        return f"torchrun-{env['MASTER_PORT']}"
    return f"pid{os.getpid()}"  # a lone process: nobody else needs to agree on it
