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


def _processed_plan(kind, n, width):
    """With the penalties, logit_bias (3 pairs a row) and a grammar's mask (every bit pattern a word can hold)."""
    plan = _plan(kind, n, width)
    plan.presence_penalty, plan.frequency_penalty = torch.linspace(-2, 2, n), torch.full((n,), 0.5)
    plan.bias_ids = torch.tensor([[5, 9, -1]] * n)
    plan.bias_values = torch.tensor([[100.0, -3.25, 0.0]] * n)
    plan.token_mask = torch.tensor([[-1, 0, 2**31 - 1, -2**31, 5]] * n, dtype=torch.int32)  # odd: a half column
    return plan


def _paged_plan(kind, n, width):
    """With each row's block table, and a prefill's cached and recomputed tokens."""
    plan = _plan(kind, n, width)
    plan.blocks = torch.arange(n * 3).view(n, 3) - 1
    if kind == "prefill":
        plan.starts, plan.resumed = torch.arange(n) % 2 * 4, torch.arange(n) % 3
    return plan


FIELDS = ("blocks", "starts", "resumed",
          "slots", "tokens", "lengths", "temperature", "top_k", "top_p", "greedy", "repetition_penalty", "ban_eos",
          "seed", "presence_penalty", "frequency_penalty", "bias_ids", "bias_values", "token_mask")


def _same(a: StepPlan, b: StepPlan) -> bool:
    def equal(x, y):
        return x is None and y is None or (x is not None and y is not None and x.dtype == y.dtype
                                           and torch.equal(x, y))
    return a.kind == b.kind and a.logprobs == b.logprobs and a.full_logprobs == b.full_logprobs and all(
        equal(getattr(a, k), getattr(b, k)) for k in FIELDS)


def _round_trip(plan: StepPlan) -> StepPlan:
    return protocol.unpack(protocol.pack(plan), plan.kind, plan.logprobs, plan.full_logprobs,
                           plan.tokens.shape[1], plan.presence_penalty is not None,
                           0 if plan.bias_ids is None else plan.bias_ids.shape[1],
                           0 if plan.token_mask is None else plan.token_mask.shape[1],
                           0 if plan.blocks is None else plan.blocks.shape[1])


@pytest.mark.parametrize("make", [_plan, _processed_plan, _paged_plan])
def test_pack_and_unpack_keep_every_field_bit_for_bit(make):
    plan = make("prefill", 5, 7)
    assert _same(_round_trip(plan), plan)


def _follow_protocol(rank, world_size, tensor, pipeline):
    ps = ParallelState.build(tensor, pipeline)
    plans = [_plan("prefill", 3, 4), _plan("decode", 2, 1), _processed_plan("decode", 2, 1),
             _paged_plan("prefill", 3, 4), _paged_plan("decode", 2, 1)]
    # the decode plans inline (a paged one's 3 blocks a row too), the prefills' payloads apart
    commands = protocol.Commands(ps, inline_rows=2, inline_blocks=3)
    if rank == 0:
        for plan in plans:
            commands.send_step(plan)
            commands.send_idle()  # followers skip it
        commands.send_shutdown()
        return True
    received = []
    while (plan := commands.receive()) is not None:
        received.append(plan)
    return len(received) == len(plans) and all(_same(a, b) for a, b in zip(received, plans))


@pytest.mark.slow
@pytest.mark.parametrize("tensor, pipeline", [(1, 3), (2, 2)])
def test_every_rank_receives_every_plan_then_shutdown_over_real_processes(tensor, pipeline):
    # commands reach the first stage's tensor ranks by broadcast, later stages down the pipeline
    assert run_ranks(_follow_protocol, tensor * pipeline, tensor, pipeline) == [True] * (tensor * pipeline)
