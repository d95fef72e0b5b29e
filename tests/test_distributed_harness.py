import torch
import torch.distributed as dist

from tests.distributed import run_ranks


def _sum_of_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def test_ranks_are_real_processes_joined_by_gloo():
    assert run_ranks(_sum_of_ranks, 3) == [3.0, 3.0, 3.0]
