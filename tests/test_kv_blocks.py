"""The paged cache's block accounting (model/serve/kv_blocks.py): prefix reuse, reference counts, LRU eviction,
and a randomized run of thousands of admissions, steps, cancellations and preemptions against a model of the
cache's contents, so that no block is leaked, and none is shared unless it holds the same tokens."""
import random

import pytest

from fleetgen.model.serve.kv_blocks import BlockManager

SIZE = 4


def test_a_shared_prefix_is_computed_once_and_its_blocks_counted_by_reference():
    blocks = BlockManager(num_blocks=8, block_size=SIZE)
    system = list(range(100, 108))  # two full blocks
    assert blocks.admit("a", system + [1, 2], reserve=12) == 0
    blocks.written("a", system + [1, 2])
    assert blocks.admit("b", system + [3], reserve=12) == 8  # both blocks found
    assert blocks.tables["a"].blocks[:2] == blocks.tables["b"].blocks[:2]
    assert [blocks.blocks[b].refs for b in blocks.tables["a"].blocks[:2]] == [2, 2]
    assert (blocks.hit_tokens, blocks.computed_tokens) == (8, 10 + 1)
    blocks.free("a")
    assert [blocks.blocks[b].refs for b in blocks.tables["b"].blocks[:2]] == [1, 1]


def test_the_last_prompt_token_is_always_computed():
    blocks = BlockManager(num_blocks=8, block_size=SIZE)
    prompt = list(range(8))
    blocks.admit("a", prompt, 8)
    blocks.written("a", prompt)
    assert blocks.admit("b", prompt, 9) == 4  # not 8: the logits of token 7 are needed


def test_freed_prefixes_stay_findable_until_their_blocks_are_taken_least_recently_freed_first():
    blocks = BlockManager(num_blocks=6, block_size=SIZE)
    old, new = list(range(0, 8)), list(range(50, 58))
    for seq, prompt in (("old", old), ("new", new)):
        blocks.admit(seq, prompt + [9], 9)
        blocks.written(seq, prompt + [9])
        blocks.free(seq)
    assert blocks.free_blocks == 6
    assert blocks.admit("again", new + [9], 9) == 8  # still cached, though free
    blocks.free("again")
    blocks.admit("other", list(range(200, 208)), 8)  # two blocks, the least recently freed: old's
    assert blocks.admit("new again", new + [1], 9) == 8
    assert blocks.admit("old again", old + [1], 9) is None  # old's were taken, and two blocks are left
    blocks.free("other")
    assert blocks.admit("old again", old + [1], 9) == 0


def test_admission_is_by_free_blocks_and_a_refusal_takes_nothing():
    blocks = BlockManager(num_blocks=5, block_size=SIZE)
    assert blocks.admit("a", [1] * 10, reserve=16) == 0  # 4 blocks
    assert blocks.admit("b", [2] * 6, reserve=8) is None and blocks.free_blocks == 1 and "b" not in blocks.tables
    assert blocks.grow("a", 20) and not blocks.grow("a", 21) and blocks.free_blocks == 0
    blocks.free("a")
    assert blocks.free_blocks == 5


def test_without_prefix_caching_nothing_is_shared():
    blocks = BlockManager(num_blocks=8, block_size=SIZE, prefix_caching=False)
    blocks.admit("a", list(range(9)), 9)
    blocks.written("a", list(range(9)))
    assert blocks.admit("b", list(range(9)), 9) == 0
    assert not set(blocks.tables["a"].blocks) & set(blocks.tables["b"].blocks)


@pytest.mark.parametrize("seed", range(6))
def test_thousands_of_random_lives_leak_nothing_and_share_only_equal_tokens(seed):
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks=rng.choice([6, 12, 40]), block_size=rng.choice([1, 2, 4, 16]),
                          prefix_caching=seed % 3 != 2)
    size = blocks.block_size
    contents: dict[int, dict[int, int]] = {}  # block -> offset -> token written there (the cache's memory)
    heads = [[rng.randrange(50) for _ in range(rng.randrange(1, 40))] for _ in range(5)]  # shared prompt heads
    live: dict[int, list[int]] = {}  # sequence -> its tokens so far (all written)

    def write(seq, tokens, start):
        table = blocks.tables[seq].blocks
        for position in range(start, len(tokens)):
            block = table[position // size]
            assert blocks.blocks[block].refs == 1, "a write into a block another sequence holds"
            contents.setdefault(block, {})[position % size] = tokens[position]
        blocks.written(seq, tokens)

    for n in range(3000):
        action = rng.random()
        if action < 0.4 or not live:  # a new sequence: a shared head, its own tail
            prompt = rng.choice(heads) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
            cached = blocks.admit(n, prompt, len(prompt) + rng.randrange(0, 8))
            if cached is not None:
                assert cached % size == 0 and cached < len(prompt)
                for position in range(cached):  # a hit holds exactly the prompt's tokens
                    block = blocks.tables[n].blocks[position // size]
                    assert contents[block][position % size] == prompt[position]
                live[n] = prompt
                write(n, prompt, cached)
        elif action < 0.85:  # a decode step: one more token, a block more when need be, else preempted
            seq = rng.choice(list(live))
            if blocks.grow(seq, len(live[seq]) + 1):
                live[seq] = live[seq] + [rng.randrange(50)]
                write(seq, live[seq], len(live[seq]) - 1)
            else:
                blocks.free(seq)
                del live[seq]
        else:  # finished or cancelled
            seq = rng.choice(list(live))
            blocks.free(seq)
            del live[seq]
        check(blocks, live, contents)
    for seq in list(live):
        blocks.free(seq)
    assert blocks.free_blocks == len(blocks.blocks) and all(b.refs == 0 for b in blocks.blocks)


def check(blocks, live, contents):
    holders: dict[int, int] = {}
    for seq, table in blocks.tables.items():
        assert len(set(table.blocks)) == len(table.blocks)
        assert len(table.blocks) >= blocks.blocks_for(len(live[seq]))
        for position, token in enumerate(live[seq]):  # every sequence reads back its own tokens
            assert contents[table.blocks[position // blocks.block_size]][position % blocks.block_size] == token
        for block in table.blocks:
            holders[block] = holders.get(block, 0) + 1
    for block in blocks.blocks:
        assert block.refs == holders.get(block.id, 0)
        assert (block.refs == 0) == (block.id in blocks._free)
        if block.key is not None:
            assert blocks._cached[block.key] == block.id
    assert len(blocks._cached) == sum(b.key is not None for b in blocks.blocks)
