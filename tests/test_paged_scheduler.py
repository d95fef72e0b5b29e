"""The scheduler over KV-cache blocks (model/serve/scheduler.py), no model: admission by free blocks, the
sequence admitted last preempted when a decode needs a block, and its recompute."""
from concurrent.futures import Future
from dataclasses import dataclass

from fleetgen.model.serve.kv_blocks import BlockManager
from fleetgen.model.serve.scheduler import Scheduler, SequenceState


@dataclass(frozen=True)
class Request:
    prompt: tuple
    max_new_tokens: int
    logprobs: bool = False
    full_logprobs: bool = False


def sequence(prompt, new=100) -> SequenceState:
    return SequenceState(Request(tuple(prompt), new), Future())


def test_admission_waits_for_free_blocks_not_only_free_slots():
    scheduler = Scheduler([range(0, 4)], 1000, BlockManager(num_blocks=3, block_size=4))
    a, b = sequence(range(8)), sequence(range(10, 18))  # two blocks each
    scheduler.add(a)
    scheduler.add(b)
    step = scheduler.next_step(0)
    assert step.kind == "prefill" and step.sequences == [a] and list(scheduler.waiting) == [b]


def test_a_decode_without_a_block_preempts_the_sequence_admitted_last_which_recomputes_first_in_line():
    scheduler = Scheduler([range(0, 2)], 1000, BlockManager(num_blocks=4, block_size=4, prefix_caching=False))
    a, b = sequence(range(4)), sequence(range(10, 14))
    scheduler.add(a)
    scheduler.add(b)
    prefill = scheduler.next_step(0)
    assert prefill.sequences == [a, b]
    for s, token in ((a, 7), (b, 8)):
        s.tokens.append(token)
    assert scheduler.next_step(0).sequences == [a, b]  # a second block each: all four taken
    for s, token in ((a, 1), (b, 2)):
        s.tokens += [token] * 4
    step = scheduler.next_step(0)  # each needs a third block: b, admitted last, goes
    assert step.kind == "decode" and step.sequences == [a] and scheduler.preemptions == 1
    assert list(scheduler.waiting) == [b] and not scheduler.is_current(prefill, 1)
    a.future.cancel()
    scheduler.drop_cancelled()
    again = scheduler.next_step(0)
    assert again.kind == "prefill" and again.sequences == [b]
    assert again.tokens == [list(range(10, 14)) + [8, 2, 2, 2, 2]]  # its prompt and what it generated
    assert not scheduler.is_current(prefill, 1) and scheduler.is_current(again, 0)  # a later admission
    scheduler.clear()
    assert scheduler.blocks.free_blocks == 4 and not scheduler.blocks.tables


def test_a_sequence_wanting_every_prompt_logprob_computes_its_whole_prompt():
    scheduler = Scheduler([range(0, 2)], 1000, BlockManager(num_blocks=8, block_size=4))
    first, wants = sequence(range(9)), SequenceState(Request(tuple(range(9)), 4, logprobs=True), Future())
    scheduler.add(first)
    scheduler.next_step(0)
    scheduler.add(wants)
    assert scheduler.next_step(0).sequences == [wants] and wants.cached == 0
