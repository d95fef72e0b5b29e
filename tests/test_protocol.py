"""The followers' wire protocol (model/serve/protocol.py): plans packed bit for bit, sent over real processes."""
import pytest
import torch

from fleetgen.model.generate import StepPlan
from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve import protocol
from tests.distributed import run_ranks


def _plan(kind, n, width):
    return StepPlan(kind=kind, slots=torch.arange(n), tokens=torch.arange(n * width).view(n, width),
                    lengths=torch.full((n,), width), temperature=torch.linspace(0.1, 3.3, n),
                    top_k=torch.arange(n) * 7, top_p=torch.full((n,), 0.9), greedy=torch.arange(n) % 2 == 0,
                    repetition_penalty=torch.full((n,), 1.2), ban_eos=torch.arange(n) % 3 == 0,
                    seed=torch.arange(n) - 1, logprobs=True, full_logprobs=kind == "decode")


def _same(a: StepPlan, b: StepPlan) -> bool:
    return a.kind == b.kind and a.logprobs == b.logprobs and a.full_logprobs == b.full_logprobs and all(
        getattr(a, k).dtype == getattr(b, k).dtype and torch.equal(getattr(a, k), getattr(b, k))
        for k in ("slots", "tokens", "lengths", "temperature", "top_k", "top_p", "greedy", "repetition_penalty",
                  "ban_eos", "seed"))


def test_pack_and_unpack_keep_every_field_bit_for_bit():
    plan = _plan("prefill", 5, 7)
    assert _same(protocol.unpack(protocol.pack(plan), "prefill", True, False), plan)


def _follow_protocol(rank, world_size):
    ps = ParallelState.build(1, world_size)
    plans = [_plan("prefill", 3, 4), _plan("decode", 2, 1)]
    if rank == 0:
        for plan in plans:
            protocol.send_step(plan, ps)
        protocol.send_shutdown(ps)
        return True
    received = []
    while (plan := protocol.receive(ps)) is not None:
        received.append(plan)
    return len(received) == len(plans) and all(_same(a, b) for a, b in zip(received, plans))


@pytest.mark.slow
def test_followers_receive_every_plan_then_shutdown_over_real_processes():
    assert run_ranks(_follow_protocol, 3) == [True, True, True]
