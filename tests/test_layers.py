"""Layers on their own: norms, rotary layouts, the layer split, the shard plan, the KV cache, and the
tensor-parallel layers on real processes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fleetgen.model import layers
from fleetgen.model.shard import shard_plan
from fleetgen.model.config import ModelConfig
from fleetgen.model.kv_cache import KVCache
from fleetgen.model.layers import (ColumnParallelLinear, LayerNorm, RowParallelLinear, VocabParallelEmbedding,
                                   apply_rotary, rotary_tables)
from fleetgen.model.parallel import ParallelState
from fleetgen.model.transformer import local_kv_heads, stage_layers
from tests.distributed import run_ranks

CPU = torch.device("cpu")


def _config(**changes) -> ModelConfig:
    base = dict(family="nemotron", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                num_query_groups=2, head_dim=8, vocab_size=250, max_position_embeddings=64,
                position_embedding="rope", normalization="layernorm1p", activation="squared_relu",
                qkv_bias=False, proj_bias=False, mlp_bias=False, tie_word_embeddings=False)
    return ModelConfig(**{**base, **changes})


def _ps(tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> ParallelState:
    """A rank's coordinates without processes: enough for shapes and plans, never for collectives."""
    return ParallelState(world_rank=pp_rank * tp_size + tp_rank, replica=0, tp_rank=tp_rank, tp_size=tp_size,
                         pp_rank=pp_rank, pp_size=pp_size, tp_group=None, pp_group=None, replica_group=None,
                         replica_ranks=tuple(range(tp_size * pp_size)), device=CPU, backend="gloo")


def test_layer_norm_1p_scales_by_weight_plus_one():
    norm = LayerNorm(16, 1e-5, zero_centered=True, device=CPU, dtype=torch.float32)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 16)
    assert torch.allclose(norm(x), F.layer_norm(x, (16,), norm.weight + 1, norm.bias, 1e-5))
    assert layers.LAYER_NORM_IMPL == "torch"  # CPU: apex's kernel never runs here


def test_interleaved_rotary_matches_gptj():
    from transformers.models.gptj import modeling_gptj  # here, not at the top: spawned ranks import this file
    x = torch.randn(2, 5, 3, 16)  # [n, s, heads, head_dim], rotary on the first 8
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = rotary_tables(positions, 8, 10000.0, interleaved=True)
    table = modeling_gptj.create_sinusoidal_positions(16, 8)[positions]  # [n, s, 8]: sin | cos
    hf_sin, hf_cos = table.split(4, dim=-1)
    want = torch.cat([modeling_gptj.apply_rotary_pos_emb(x[..., :8], hf_sin, hf_cos), x[..., 8:]], dim=-1)
    assert torch.allclose(apply_rotary(x, cos, sin, interleaved=True), want, atol=1e-5)


def test_half_rotary_matches_neox_style():
    from transformers.models.nemotron import modeling_nemotron
    x = torch.randn(2, 5, 3, 16).transpose(1, 2)  # HF layout [n, heads, s, d]
    positions = torch.arange(5).expand(2, 5) + torch.tensor([[0], [4]])
    cos, sin = rotary_tables(positions, 8, 10000.0, interleaved=False)
    want, _ = modeling_nemotron.apply_rotary_pos_emb(x, x, cos, sin)
    got = apply_rotary(x.transpose(1, 2), cos, sin, interleaved=False).transpose(1, 2)
    assert torch.allclose(got, want, atol=1e-5)


def test_layers_split_evenly_with_the_first_stages_taking_the_remainder():
    assert [list(stage_layers(3, 2, r)) for r in range(2)] == [[0, 1], [2]]
    assert [list(stage_layers(10, 4, r)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="2 layers cannot fill 3 stages"):
        stage_layers(2, 3, 0)


def test_query_groups_split_or_replicate_over_tensor_parallel_ranks():
    assert [local_kv_heads(_config(num_query_groups=g), tp) for g, tp in ((2, 1), (2, 2), (2, 4), (1, 8))] \
        == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by tensor parallel size 3"):
        local_kv_heads(_config(), 3)
    with pytest.raises(ValueError, match="num_query_groups=6 and tensor parallel size 4 must divide"):
        local_kv_heads(_config(num_query_groups=6, num_attention_heads=24), 4)


def _qkv(plan, layer=0):
    return [(p.name.split(".")[-2], p.rows.start, p.rows.stop, p.dst.start)
            for p in plan[f"layers.{layer}.self_attention.linear_qkv.weight"]]


def test_shard_plan_gives_each_rank_its_heads_and_groups():
    config = _config()  # 8 heads, 2 groups, head_dim 8
    rank1 = shard_plan(config, _ps(1, 2), 256, range(0, 4), {"embedding.word_embeddings.weight": 250,
                                                              "output_layer.weight": 250})
    assert _qkv(rank1) == [("query", 32, 64, 0), ("key", 8, 16, 32), ("value", 8, 16, 40)]
    rank3 = shard_plan(config, _ps(3, 4), 512, range(0, 4), {"embedding.word_embeddings.weight": 250,
                                                             "output_layer.weight": 250})
    # TP 4 > 2 groups: ranks 2 and 3 both serve group 1
    assert _qkv(rank3) == [("query", 48, 64, 0), ("key", 8, 16, 16), ("value", 8, 16, 24)]
    fc2 = rank3["layers.0.mlp.linear_fc2.weight"][0]
    assert (fc2.cols.start, fc2.cols.stop) == (72, 96)


def test_shard_plan_pads_the_vocabulary_and_reads_tied_embeddings_on_the_last_stage():
    config = _config(family="gpt2", tie_word_embeddings=True, activation="swiglu")
    rows = {"embedding.word_embeddings.weight": 250}
    padded = config.padded_vocab_size(2, 250)
    assert padded == 256
    plans = [shard_plan(config, _ps(r, 2, 1, 2), padded, range(2, 4), rows) for r in range(2)]
    # rows 0-127 on TP rank 0, 128-249 on rank 1 whose last 6 rows stay zero padding
    assert [[(p.name, p.rows, p.dst) for p in plan["output_layer.weight"]] for plan in plans] == [
        [("embedding.word_embeddings.weight", slice(0, 128), slice(0, 128))],
        [("embedding.word_embeddings.weight", slice(128, 250), slice(0, 122))]]
    fc1 = [(p.name, p.rows, p.dst) for p in plans[1]["layers.0.mlp.linear_fc1.weight"]]
    assert fc1 == [("layers.2.mlp.gate.weight", slice(48, 96), slice(0, 48)),
                   ("layers.2.mlp.linear_fc1.weight", slice(48, 96), slice(48, 96))]
    whole = shard_plan(config, _ps(), 256, range(0, 4), rows)
    assert "output_layer.weight" not in whole  # one tied parameter serves both ends
    assert "embedding.word_embeddings.weight" in whole and "layers.3.mlp.linear_fc2.weight" in whole


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


def _tensor_parallel_layers(rank: int, world_size: int) -> dict:
    """TP 2 in 2 replicas: each rank's column→row MLP and vocab embedding, from full seeded weights."""
    ps = ParallelState.build(2, 1)
    full = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(12, 6, generator=full), torch.randn(12, generator=full)
    w2, b2 = torch.randn(6, 12, generator=full), torch.randn(6, generator=full)
    table = torch.randn(16, 6, generator=full)
    x = torch.randn(3, 6, generator=full)
    ids = torch.tensor([[0, 7, 8, 15]])
    column = ColumnParallelLinear(6, 12, ps=ps, bias=True, gather_output=False, dtype=torch.float32)
    row = RowParallelLinear(12, 6, ps=ps, bias=True, input_is_parallel=True, dtype=torch.float32)
    row_of_full = RowParallelLinear(12, 6, ps=ps, bias=True, input_is_parallel=False, dtype=torch.float32)
    gathered = ColumnParallelLinear(6, 12, ps=ps, bias=True, gather_output=True, dtype=torch.float32)
    embedding = VocabParallelEmbedding(16, 6, ps=ps, dtype=torch.float32)
    half = slice(6 * ps.tp_rank, 6 * ps.tp_rank + 6)
    with torch.no_grad():
        for layer in (column, gathered):
            layer.weight.copy_(w1[half])
            layer.bias.copy_(b1[half])
        for layer in (row, row_of_full):
            layer.weight.copy_(w2[:, half])
            layer.bias.copy_(b2)
        embedding.weight.copy_(table[8 * ps.tp_rank:8 * ps.tp_rank + 8])
    hidden = F.linear(x, w1, b1)  # [3, 12], whole on every rank
    return {"mlp": row(column(x)), "want_mlp": F.linear(hidden, w2, b2), "row_of_full": row_of_full(hidden),
            "gathered": gathered(x), "want_gathered": F.linear(x, w1, b1),
            "embedding": embedding(ids), "want_embedding": table[ids],
            "layout": (ps.replica, ps.tp_rank, ps.pp_rank, ps.first_rank, ps.last_stage_ranks, ps.replica_ranks)}


@pytest.mark.slow
def test_tensor_parallel_layers_match_the_full_layers_in_every_replica():
    results = run_ranks(_tensor_parallel_layers, 4)
    for r in results:
        assert torch.allclose(r["mlp"], r["want_mlp"], atol=1e-5)
        assert torch.allclose(r["row_of_full"], r["want_mlp"], atol=1e-5)
        assert torch.allclose(r["gathered"], r["want_gathered"], atol=1e-5)
        assert torch.equal(r["embedding"], r["want_embedding"])
    assert [r["layout"] for r in results] == [(0, 0, 0, 0, (0, 1), (0, 1)), (0, 1, 0, 0, (0, 1), (0, 1)),
                                              (1, 0, 0, 2, (2, 3), (2, 3)), (1, 1, 0, 2, (2, 3), (2, 3))]
