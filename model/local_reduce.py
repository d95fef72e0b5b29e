"""All-reduce through shared memory for the tensor-parallel ranks of one CPU host.

A decode step all-reduces twice a layer, a few KB each time. Over gloo's TCP loopback each costs a round of
socket wake-ups (0.1-2 ms on loaded cores: more than the layer's own work at batch 16, which made tensor 2
slower than one rank; benchmarks/decode_scaling.py). Here each rank copies its partial sum into its own slot
of a shared buffer, raises its flag, waits (spinning, then napping) until every rank's flag is up,
and sums the slots itself in rank order, so every rank gets the same bits. Two buffers alternate: a rank
writes buffer b again only two reductions later, after every rank has raised its flag for the one between,
which it does only once it has finished reading b.

It relies on the host's memory order: x86 never makes a store visible before an earlier one, so a raised
flag means the data before it is there. Only non-temporal stores break that rule, and memcpy uses them only
for copies of several MiB; so ParallelState uses it on x86-64 only, for tensors up to SLOT_BYTES (larger ones
are bandwidth-bound, where gloo does as well).
"""
from __future__ import annotations

import os
import platform
import secrets
import time
from pathlib import Path

import torch
import torch.distributed as dist

SLOT_BYTES = 1 << 20       # the largest all-reduce it takes, per rank
SPIN_S = 200e-6            # busy-wait this long; then nap between looks, a tenth of the wait so far, up to
MAX_NAP_S = 1e-3           # this: a peer still loading, or stopped, must not cost this rank a core
SHM = Path("/dev/shm")


class SharedMemoryReduce:
    def __init__(self, buffer: torch.Tensor, rank: int, size: int, timeout_s: float):
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.slots = buffer[:2 * size * SLOT_BYTES].view(2, size, SLOT_BYTES)  # [buffer, rank, bytes]
        self.flags = buffer[2 * size * SLOT_BYTES:].view(torch.int64)          # [rank]: last reduction posted
        self.count = 0

    @classmethod
    def create(cls, group, timeout_s: float) -> SharedMemoryReduce | None:
        """Collective over group (a tensor-parallel group): a shared buffer when every rank of the group is on
        this host and it is x86-64 with /dev/shm, else None (then gloo reduces)."""
        here = (platform.node(), platform.machine() in ("x86_64", "AMD64") and SHM.is_dir())
        hosts = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, here, group=group)
        if any(host != (here[0], True) for host in hosts):
            return None
        rank, size = dist.get_rank(group), len(hosts)
        nbytes = 2 * size * SLOT_BYTES + 8 * size
        name = [str(SHM / f"fleetgen-tp-{os.getpid()}-{secrets.token_hex(4)}")]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        path = Path(name[0])
        if rank == 0:
            with path.open("wb") as f:
                f.truncate(nbytes)  # zeros: no flag raised yet
        dist.barrier(group=group)
        buffer = None  # stays None where the host name is the same but /dev/shm another (a container's own)
        if path.is_file():  # torch.from_file would create a missing file
            buffer = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
        mapped = [None] * size
        dist.all_gather_object(mapped, buffer is not None, group=group)  # every rank has tried: the name can go
        if rank == 0:
            path.unlink()
        return cls(buffer, rank, size, timeout_s) if all(mapped) else None

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= SLOT_BYTES

    def all_reduce(self, x: torch.Tensor) -> None:
        """Sum x (CPU, contiguous, at most SLOT_BYTES) over the group's ranks, in place."""
        self.count += 1
        nbytes = x.numel() * x.element_size()
        slots = self.slots[self.count % 2, :, :nbytes].view(x.dtype).view(self.size, *x.shape)
        slots[self.rank].copy_(x)
        self.flags[self.rank] = self.count  # after the copy: x86 keeps the two stores in order
        self._wait_for_all(self.count)
        torch.sum(slots, dim=0, out=x)

    def _wait_for_all(self, count: int) -> None:
        started = time.monotonic()
        while int(self.flags.min()) < count:
            waited = time.monotonic() - started
            if waited > SPIN_S:
                time.sleep(min(waited / 10, MAX_NAP_S))  # frees the GIL and the core
            if waited > self.timeout_s:
                raise TimeoutError(f"tensor-parallel all-reduce: ranks {self._missing(count)} did not arrive "
                                   f"within {self.timeout_s:.0f} s")

    def _missing(self, count: int) -> list[int]:
        return [r for r, flag in enumerate(self.flags.tolist()) if flag < count]
