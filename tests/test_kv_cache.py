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
