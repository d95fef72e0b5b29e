"""Where this rank sits in a replica (tensor × pipeline grid) and the collectives the decoder calls.

Global rank layout, Megatron's with tensor fastest: rank = replica * (PP * TP) + pp_rank * TP + tp_rank.
Every collective below is a plain function called on a visible line of some forward; each is a no-op when
its group has one rank, so a lone process (ParallelState.single) runs the same code without
torch.distributed. Gloo (CPU) and NCCL (GPU) take the same path; only the device differs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from fleetgen.model.local_reduce import SharedMemoryReduce


@dataclass(frozen=True)
class ParallelState:
    world_rank: int
    replica: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    tp_group: Any               # torch.distributed ProcessGroup, None for a lone process
    pp_group: Any
    replica_group: Any          # all PP * TP ranks of this replica
    replica_ranks: tuple[int, ...]
    device: torch.device
    backend: str                # "gloo" | "nccl" | "none" (no torch.distributed)
    tp_shared_memory: Optional[SharedMemoryReduce] = None  # CPU TP ranks of one host: their all-reduce
    reply_group: Any = None     # the output rank and the leader, when they differ (pipeline > 1)

    @classmethod
    def build(cls, tensor: int, pipeline: int, timeout_s: float = 600) -> ParallelState:
        """Collective over the world: every rank creates every group, in the same order. timeout_s bounds a
        shared-memory all-reduce's wait, as the process group's timeout bounds gloo's."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelState.build: torch.distributed is not initialised")
        world, rank = dist.get_world_size(), dist.get_rank()
        per_replica = tensor * pipeline
        if tensor < 1 or pipeline < 1 or world % per_replica:
            raise ValueError(f"parallel: world size {world} is not a multiple of tensor {tensor} × "
                             f"pipeline {pipeline}")
        replica, within = divmod(rank, per_replica)
        pp_rank, tp_rank = divmod(within, tensor)
        groups = {}
        for r in range(world // per_replica):
            base = r * per_replica
            for p in range(pipeline):
                groups["tp", r, p] = dist.new_group([base + p * tensor + t for t in range(tensor)])
            for t in range(tensor):
                groups["pp", r, t] = dist.new_group([base + p * tensor + t for p in range(pipeline)])
            groups["replica", r] = dist.new_group(list(range(base, base + per_replica)))
            if pipeline > 1:  # a group of its own, so that replies never queue behind activations (NCCL streams)
                groups["reply", r] = dist.new_group([base, base + per_replica - tensor])
        tp_group, device = groups["tp", replica, pp_rank], _local_device()
        shared = SharedMemoryReduce.create(tp_group, timeout_s) if tensor > 1 and device.type == "cpu" else None
        return cls(world_rank=rank, replica=replica, tp_rank=tp_rank, tp_size=tensor, pp_rank=pp_rank,
                   pp_size=pipeline, tp_group=tp_group,
                   pp_group=groups["pp", replica, tp_rank], replica_group=groups["replica", replica],
                   replica_ranks=tuple(range(replica * per_replica, (replica + 1) * per_replica)),
                   device=device, backend=dist.get_backend(), tp_shared_memory=shared,
                   reply_group=groups.get(("reply", replica)))

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> ParallelState:
        """One process holding the whole model, without torch.distributed."""
        return cls(world_rank=0, replica=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, tp_group=None,
                   pp_group=None, replica_group=None, replica_ranks=(0,),
                   device=device or _local_device(), backend="none")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def first_rank(self) -> int:
        """The replica's pipeline-first, TP-rank-0 rank: the one that serves."""
        return self.replica_ranks[0]

    @property
    def output_rank(self) -> int:
        """The last stage's TP-rank-0 rank: it turns logits into a step's outputs."""
        return self.last_stage_ranks[0]

    @property
    def last_stage_ranks(self) -> tuple[int, ...]:
        return self.replica_ranks[-self.tp_size:]

    @property
    def next_rank(self) -> int:
        return self.world_rank + self.tp_size

    @property
    def prev_rank(self) -> int:
        return self.world_rank - self.tp_size

    def describe(self) -> str:
        return (f"rank {self.world_rank} replica {self.replica} tp {self.tp_rank}/{self.tp_size} "
                f"pp {self.pp_rank}/{self.pp_size} on {device_name(self.device)} ({self.backend})")


def device_name(device: torch.device) -> str:
    """"cuda:0 (NVIDIA H200)" or "cpu": what the rank log and /health say a rank runs on."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def describe_replica_devices(ps: ParallelState) -> list[str]:
    """Collective over the replica: every rank's device_name, in replica rank order."""
    mine = f"rank {ps.world_rank}: {device_name(ps.device)}"
    if len(ps.replica_ranks) == 1:
        return [mine]
    every: list = [None] * len(ps.replica_ranks)
    dist.all_gather_object(every, mine, group=ps.replica_group)
    return every


def cpu_threads(cpus_per_task: Optional[int], ranks_per_node: int) -> int:
    """Torch threads for one rank: its Slurm CPU allocation, else an even share of this machine's cores, so
    that the ranks of a node split its cores instead of each taking all of them."""
    if cpus_per_task:
        return cpus_per_task
    return max(1, len(os.sched_getaffinity(0)) // ranks_per_node)


def _local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # the job glue picked it (set_device)
    return torch.device("cpu")


def copy_to_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Identity in inference (its backward would all-reduce): marks where a replicated input meets
    column-parallel weights."""
    return x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Sum the partial results of the TP ranks (row-parallel outputs, vocab-parallel lookups)."""
    if ps.tp_size == 1:
        return x
    # one host's CPU ranks: no sockets (local_reduce.py); a compiled step keeps gloo, which dynamo can trace
    if ps.tp_shared_memory is not None and ps.tp_shared_memory.fits(x) and not torch.compiler.is_compiling():
        ps.tp_shared_memory.all_reduce(x)
    else:
        dist.all_reduce(x, group=ps.tp_group)
    return x


def gather_from_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Concatenate the TP ranks' slices along the last dimension."""
    if ps.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)


def vocab_parallel_argmax(best: torch.Tensor, index: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """The argmax over the whole vocabulary from each TP rank's row maxima best [n] at global ids index [n]:
    the largest value wins, ties go to the lower id (as torch.argmax). Gathers 2 numbers a row, not the logits."""
    if ps.tp_size == 1:
        return index
    pairs = torch.stack((best.float(), index.float()))  # ids < 2^24 are exact in fp32
    parts = [torch.empty_like(pairs) for _ in range(ps.tp_size)]
    dist.all_gather(parts, pairs, group=ps.tp_group)
    values, ids = torch.stack(parts).unbind(1)  # [TP, n] each, rank order = vocabulary order
    return ids.gather(0, values.argmax(dim=0, keepdim=True))[0].long()


def send_to_next_pipeline_rank(x: torch.Tensor, ps: ParallelState):
    """Start sending activations to the next stage; returns the pending work to wait on."""
    return dist.isend(x.contiguous(), ps.next_rank)


def recv_from_prev_pipeline_rank(shape: tuple[int, ...], dtype: torch.dtype, ps: ParallelState) -> torch.Tensor:
    x = torch.empty(shape, dtype=dtype, device=ps.device)
    dist.recv(x, ps.prev_rank)
    return x


def send_to_first_rank(x: torch.Tensor, ps: ParallelState):
    """Output rank: start sending a step's result to the replica's leader; returns the pending work."""
    return dist.isend(x.contiguous(), ps.first_rank, group=ps.reply_group)


def recv_from_output_rank(x: torch.Tensor, ps: ParallelState):
    """Leader: start receiving a step's result into x; returns the pending work."""
    return dist.irecv(x, ps.output_rank, group=ps.reply_group)


def broadcast_from_last_stage(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Copy the last stage's TP-rank-0 tensor to every rank of the replica (in place)."""
    if len(ps.replica_ranks) > 1:
        dist.broadcast(x, src=ps.output_rank, group=ps.replica_group)
    return x
