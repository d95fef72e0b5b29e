"""The engine over a paged KV cache (model/kv_cache.py, model/serve/kv_blocks.py): admission by free blocks,
preemption by recompute when they run out, prefix reuse, and every block back in the free pool afterwards."""
import random
import time
from concurrent.futures import wait

import pytest
import torch

from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve.engine import Sampling, SequenceRequest
from tests import server_fixtures
from tests.server_fixtures import make_engine, reference_greedy, reference_logits

GREEDY = Sampling(greedy=True)
BLOCK_BYTES = 2 * 2 * 16 * 4 * 16 * 4  # the tiny model's block: k and v, 2 layers, 16 positions, 4 heads × 16, fp32
checkpoint, reference = server_fixtures.checkpoint, server_fixtures.reference


def engine_of(checkpoint, blocks=None, **options):
    gb = None if blocks is None else blocks * BLOCK_BYTES / 2**30
    engine = make_engine(checkpoint, ParallelState.single(), kv_cache_gb=gb, **options)
    engine.start()
    return engine


def prompt_of(engine, text):
    return tuple(engine.tokenizer.encode(text))


def all_blocks_free(engine) -> bool:
    blocks = engine.blocks
    return not blocks.tables and blocks.free_blocks == len(blocks.blocks) and all(b.refs == 0 for b in blocks.blocks)


def test_the_cache_size_is_its_blocks_and_must_hold_a_sequence_of_max_seq_len(checkpoint):
    engine = engine_of(checkpoint, blocks=5, max_seq_len=80)
    try:
        assert engine.generator.cache.num_blocks == 5 and engine.generator.cache.max_batch == 4
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="holds 5 blocks of 16 positions .* not one sequence of max_seq_len=81"):
        engine_of(checkpoint, blocks=5, max_seq_len=81)


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_cache_too_small_for_every_sequence_preempts_and_recomputes_to_the_same_tokens(checkpoint, reference,
                                                                                          lanes):
    """Two lanes: a sequence is preempted while its lane's step is in flight (that row lands without it)."""
    texts = ["def encode(self, o):", "import re", "class JSONDecoder(object):", "x = 1"]
    engine = engine_of(checkpoint, blocks=6, max_seq_len=96, lanes=lanes)  # four sequences that grow to ~50 each
    try:
        prompts = [prompt_of(engine, t) for t in texts]
        futures = [engine.submit(SequenceRequest(p, 40, GREEDY, logprobs=True)) for p in prompts]
        wait(futures, timeout=120)
        assert engine.scheduler.preemptions > 0
        for prompt, future in zip(prompts, futures):
            result = future.result()
            assert result.tokens == reference_greedy(reference, list(prompt), 40)
            ids = list(prompt) + result.tokens
            expected = reference_logits(reference, ids)[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])
            assert len(result.logprobs) == len(ids) - 1  # a recomputed prompt's are not counted twice
            torch.testing.assert_close(torch.tensor(result.logprobs), expected[:, 0], atol=1e-4, rtol=1e-4)
        assert all_blocks_free(engine)
    finally:
        engine.stop()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_shared_prompt_is_computed_once_and_gives_the_same_tokens(checkpoint, reference, prefix_caching):
    engine = engine_of(checkpoint, prefix_caching=prefix_caching)
    try:
        system = prompt_of(engine, "class JSONDecoder(object): a simple JSON decoder, with its docstring here")
        assert len(system) > 32
        one, other = system + prompt_of(engine, " x"), system + prompt_of(engine, " y = 2")
        first = engine.submit(SequenceRequest(one, 6, GREEDY)).result(60)
        samples = [engine.submit(SequenceRequest(other, 6, GREEDY)) for _ in range(3)]  # admitted in one step
        wait(samples, timeout=60)
        assert first.tokens == reference_greedy(reference, list(one), 6)
        want = reference_greedy(reference, list(other), 6)
        assert all(s.result().tokens == want for s in samples)
        blocks = engine.blocks
        computed = len(one) + 3 * len(other)
        if prefix_caching:  # the first sample finds the system prompt's full blocks; the two others, admitted in
            # the same step, all the first sample's full blocks, which that step writes before they read them
            assert blocks.hit_tokens == len(system) // 16 * 16 + 2 * ((len(other) - 1) // 16 * 16)
            assert blocks.computed_tokens == computed - blocks.hit_tokens
            assert [s.result().cached_tokens for s in samples] == [len(system) // 16 * 16] + \
                [(len(other) - 1) // 16 * 16] * 2  # what OpenAI's usage reports as cached_tokens
        else:
            assert (blocks.hit_tokens, blocks.computed_tokens) == (0, computed)
        assert all_blocks_free(engine)
    finally:
        engine.stop()


def test_full_logprobs_after_a_cached_prefix_are_computed_for_every_prompt_token(checkpoint, reference):
    engine = engine_of(checkpoint)
    try:
        prompt = prompt_of(engine, "class JSONDecoder(object): a simple JSON decoder, with its docstring here")
        engine.submit(SequenceRequest(prompt, 2, GREEDY)).result(60)
        result = engine.submit(SequenceRequest(prompt, 2, GREEDY, full_logprobs=True)).result(60)
        expected = reference_logits(reference, list(prompt) + result.tokens)[:-1].log_softmax(-1)
        torch.testing.assert_close(result.full_logprobs, expected, atol=1e-4, rtol=1e-4)
    finally:
        engine.stop()


def test_cancelled_and_finished_sequences_give_every_block_back(checkpoint):
    engine = engine_of(checkpoint, blocks=8)
    try:
        prompt = prompt_of(engine, "def encode(self, o):")
        futures = [engine.submit(SequenceRequest(prompt, 60, GREEDY)) for _ in range(4)]
        for future in futures[::2]:
            future.cancel()
        done = [engine.submit(SequenceRequest(prompt, 3, GREEDY)) for _ in range(2)]
        wait(futures[1::2] + done, timeout=120)
        assert not engine.scheduler.busy and all_blocks_free(engine)
    finally:
        engine.stop()


def test_random_admissions_cancellations_and_preemptions_keep_the_tokens_and_every_block(checkpoint, reference):
    """Shared heads, random tails and budgets, a third cancelled at random moments, over two lanes and a cache
    of 8 blocks: every finished sequence has the reference's tokens, and every block comes back."""
    rng = random.Random(0)
    engine = engine_of(checkpoint, blocks=8, max_seq_len=64, lanes=2)
    try:
        heads = [[rng.randrange(1, 400) for _ in range(rng.choice([17, 20, 33]))] for _ in range(3)]
        requests = []
        for _ in range(30):
            prompt = tuple(rng.choice(heads) + [rng.randrange(1, 400) for _ in range(rng.randrange(0, 6))])
            requests.append((prompt, rng.randrange(1, 20)))
        futures = []
        for prompt, budget in requests:
            futures.append(engine.submit(SequenceRequest(prompt, budget, GREEDY)))
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.02)
                rng.choice(futures).cancel()
        wait([f for f in futures if not f.cancelled()], timeout=120)  # wait() never counts a cancelled one done
        for (prompt, budget), future in zip(requests, futures):
            if not future.cancelled():
                assert future.result().tokens == reference_greedy(reference, list(prompt), budget)
        assert engine.blocks.hit_tokens > 0 and engine.scheduler.preemptions > 0
        deadline = time.monotonic() + 10  # a cancelled sequence leaves at the step loop's next turn
        while engine.scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all_blocks_free(engine)
    finally:
        engine.stop()
