import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks


def _sum_of_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def test_ranks_are_real_processes_joined_by_gloo():
    assert run_ranks(_sum_of_ranks, 3) == [3.0, 3.0, 3.0]


def _one_rank_fails(rank, world_size, how):
    if rank == 1:
        if how == "raises":
            raise ValueError("rank 1 is broken")
        os._exit(3)
    dist.all_reduce(torch.ones(1))  # the others wait for it, as they would in a model's collective
    return rank


@pytest.mark.parametrize("how, message", [("raises", "^rank 1 failed:\n.*ValueError: rank 1 is broken"),
                                          ("exits", "^rank 1 exited with code 3 and no result")])
@pytest.mark.slow
def test_a_failed_rank_fails_the_run_at_once_with_its_story(how, message):
    started = time.monotonic()
    with pytest.raises(AssertionError, match=re.compile(message, re.S)):
        run_ranks(_one_rank_fails, 3, how)
    assert time.monotonic() - started < 60  # processes start in seconds; the collective's timeout is 300 s
