"""The paged KV cache (model/kv_cache.py)."""
import pytest
import torch

from fleetgen.model.kv_cache import KVCache

CPU = torch.device("cpu")


def cache(**sizes) -> KVCache:
    shape = dict(num_layers=2, max_batch=3, max_seq_len=8, kv_heads=2, head_dim=4, dtype=torch.float32,
                 device=CPU, block_size=4)
    return KVCache(**{**shape, **sizes})


def test_slots_start_with_their_own_blocks_like_a_static_cache():
    c = cache()
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    c.update(1, torch.tensor([2, 0]), torch.tensor([[0, 1, 2], [4, 5, 6]]), k, v)
    keys, values = c.window(1, torch.arange(3), 7)
    assert keys.shape == (3, 7, 2, 4)
    assert torch.equal(keys[0, 4:7], k[1]) and torch.equal(values[2, :3], v[0])
    assert torch.equal(c.k[1, 2 * 2, :3], k[0])  # slot 2's first block is block 4 (two blocks a slot)
    assert not c.k[0].any()
    assert c.bytes == 2 * 2 * (3 * 2 + 1) * 4 * 2 * 4 * 4  # one scratch block
    assert c.describe().startswith("KV cache 0.0 MiB: 2 layers × 6 blocks (+1 scratch) × 4 tokens")


def test_rows_read_through_their_tables_and_may_share_blocks():
    c = cache(num_blocks=4)
    assert not c.identity_tables
    c.set_tables(torch.tensor([0, 1]), torch.tensor([[3, 1], [3, -1]]))  # slot 1 shares slot 0's first block
    k = torch.randn(1, 6, 2, 4)
    c.update(0, torch.tensor([0]), torch.arange(6)[None], k, k)
    keys, _ = c.window(0, torch.tensor([1, 0]), 6)
    assert torch.equal(keys[1], k[0])
    assert torch.equal(keys[0, :4], k[0, :4])  # the shared block
    assert not keys[0, 4:].any()  # slot 1 has no second block: the scratch block, never written by a real row
    assert torch.equal(c.table[1], torch.tensor([3, 4, 4]))  # -1 and the rest of the row: scratch


def test_padding_writes_land_in_the_scratch_block():
    c = cache()
    k = torch.ones(1, 1, 2, 4)
    c.update(0, torch.tensor([1]), torch.tensor([[c.scratch]]), k, k)
    assert c.k[0, -1].any() and not c.k[0, :-1].any()


def test_lane_views_share_blocks_and_tables():
    c = cache()
    lane = c.slots(1, 2)
    lane.set_tables(torch.tensor([0]), torch.tensor([[5]]))
    assert c.table[1, 0] == 5 and lane.k is c.k


def test_windows_on_a_cpu_reuse_one_buffer_and_read_what_the_tables_say():
    c = cache(num_layers=3, max_batch=4, max_seq_len=16)
    k, v = torch.randn(3, 4, 16, 2, 4), torch.randn(3, 4, 16, 2, 4)
    for layer in range(3):
        c.update(layer, torch.arange(4), torch.arange(16).expand(4, 16), k[layer], v[layer])
    big_k, big_v = c.window(0, torch.tensor([3, 1, 0]), 13)
    assert torch.equal(big_k, k[0, [3, 1, 0], :13]) and torch.equal(big_v, v[0, [3, 1, 0], :13])
    first = big_k.data_ptr()
    lane = c.slots(2, 2)  # a lane's view shares the buffer
    keys, values = lane.window(2, torch.tensor([1]), 5)  # smaller: the same memory, no allocation
    assert torch.equal(keys, k[2, 3:4, :5]) and torch.equal(values, v[2, 3:4, :5])
    assert keys.data_ptr() == first and values.data_ptr() != first


def test_a_cache_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        cache(num_blocks=0)
