"""The static KV cache (model/kv_cache.py)."""
import torch

from fleetgen.model.kv_cache import KVCache

CPU = torch.device("cpu")


def test_kv_cache_stores_rows_at_their_own_positions():
    cache = KVCache(num_layers=2, max_batch=3, max_seq_len=8, kv_heads=2, head_dim=4, dtype=torch.float32,
                    device=CPU)
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    cache.update(1, torch.tensor([2, 0]), torch.tensor([[0, 1, 2], [4, 5, 6]]), k, v)
    keys, values = cache.window(1, 3, 7)
    assert torch.equal(keys[0, 4:7], k[1]) and torch.equal(values[2, :3], v[0])
    assert keys.data_ptr() == cache.k[1].data_ptr()  # a view: decode reads the cache in place
    assert not cache.k[0].any()
    assert cache.bytes == 2 * 2 * 3 * (8 + 1) * 2 * 4 * 4  # one scratch position per slot
    assert cache.describe().startswith("KV cache 0.0 MiB: 2 layers × 3 slots × 8 tokens")


def test_rows_of_a_cache_write_into_it_at_their_own_slots():
    cache = KVCache(num_layers=1, max_batch=4, max_seq_len=8, kv_heads=1, head_dim=2, dtype=torch.float32,
                    device=CPU)
    part = cache.rows(2, 4)  # a decode micro-batch of slots 2 and 3
    k, v = torch.randn(2, 1, 1, 2), torch.randn(2, 1, 1, 2)
    part.update(0, torch.arange(2), torch.tensor([[5], [1]]), k, v)
    assert torch.equal(cache.k[0, 2, 5], k[0, 0]) and torch.equal(cache.v[0, 3, 1], v[1, 0])
    keys, _ = part.window(0, 2, 6)
    assert keys.data_ptr() == cache.k[0, 2].data_ptr() and part.max_batch == 2
    assert cache.k[0, :2].count_nonzero() == 0
