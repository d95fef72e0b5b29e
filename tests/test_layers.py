"""Layers on their own: norms, rotary layouts, the layer split, the shard plan, the KV cache, and the
tensor-parallel layers on real processes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fleetgen.model import layers
from fleetgen.model.layers import (ColumnParallelLinear, LayerNorm, RowParallelLinear, VocabParallelEmbedding,
                                   apply_rotary, rotary_tables)
from fleetgen.model.parallel import ParallelState
from tests.distributed import run_ranks

CPU = torch.device("cpu")


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
