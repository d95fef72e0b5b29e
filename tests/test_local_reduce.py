"""The shared-memory all-reduce of one host's CPU tensor ranks (model/local_reduce.py), on real processes."""
from __future__ import annotations

import random
import time

import pytest
import torch

from fleetgen.model.local_reduce import SLOT_BYTES
from fleetgen.model.parallel import ParallelState, reduce_from_tensor_model_parallel_region
from tests.distributed import run_ranks

ROUNDS = 300


def _reduce_many(rank: int, world_size: int) -> list:
    """Many back-to-back reductions of every size and dtype, ranks arriving late at random; each rank knows
    every rank's input (seeded), so it checks each sum without another collective in between."""
    ps = ParallelState.build(world_size, 1)
    assert ps.tp_shared_memory is not None
    jitter, wrong = random.Random(rank), []
    for i in range(ROUNDS):
        dtype = (torch.float32, torch.bfloat16)[i % 2]
        shape = [(16, 1, 768), (1, 5), (3, 7, 11)][i % 3]
        inputs = [torch.randn(shape, generator=torch.Generator().manual_seed(1000 * i + r)).to(dtype)
                  for r in range(world_size)]
        if jitter.random() < 0.1:
            time.sleep(jitter.random() / 100)  # a rank late by up to 10 ms
        got = reduce_from_tensor_model_parallel_region(inputs[rank].clone(), ps)
        if not torch.equal(got, torch.stack(inputs).sum(0)):  # the same sum, in rank order
            wrong.append(i)
    return [wrong, ps.tp_shared_memory.count, _bits(got)]


def _bits(x: torch.Tensor) -> bytes:
    return x.float().numpy().tobytes()


@pytest.mark.parametrize("ranks", [2, 3])
def test_shared_memory_all_reduce_sums_like_gloo_and_gives_every_rank_the_same_bits(ranks):
    results = run_ranks(_reduce_many, ranks)
    for wrong, count, _ in results:
        assert wrong == [] and count == ROUNDS
    assert len({bits for _, _, bits in results}) == 1  # identical activations on every TP rank


def _large_and_absent(rank: int, world_size: int) -> list:
    ps = ParallelState.build(world_size, 1, timeout_s=2)
    large = torch.full((SLOT_BYTES // 4 + 1,), float(rank + 1))  # one element past the slot: gloo's
    reduce_from_tensor_model_parallel_region(large, ps)
    outcome = "returned"
    if rank == 0:  # rank 1 never comes to this one
        try:
            reduce_from_tensor_model_parallel_region(torch.ones(4), ps)
        except TimeoutError as e:
            outcome = str(e)
    return [float(large[0]), ps.tp_shared_memory.count, outcome]


def test_a_tensor_over_the_slot_goes_through_gloo_and_a_missing_rank_times_out_by_name():
    (sum0, count0, outcome0), (sum1, _, _) = run_ranks(_large_and_absent, 2)
    assert sum0 == sum1 == 3.0 and count0 == 1  # the large one did not use the shared buffer
    assert outcome0 == "tensor-parallel all-reduce: ranks [1] did not arrive within 2 s"
