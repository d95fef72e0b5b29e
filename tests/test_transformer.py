"""The decoder's split rules (model/transformer.py): layers over pipeline stages, query groups over tensor ranks."""
from dataclasses import replace

import pytest

from fleetgen.model.split import local_kv_heads, output_layer_share, stage_layers
from tests.checkpoint_writers import small_config


def test_layers_split_evenly_with_the_first_stages_taking_the_remainder():
    light_head = small_config(vocab_size=8)  # an output layer that costs next to nothing
    assert [list(stage_layers(replace(light_head, num_layers=3), 2, r)) for r in range(2)] == [[0, 1], [2]]
    assert [list(stage_layers(replace(light_head, num_layers=10), 4, r)) for r in range(4)] \
        == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="num_layers=2 cannot fill 3 pipeline stages"):
        stage_layers(replace(light_head, num_layers=2), 3, 0)


def test_the_last_stage_takes_fewer_layers_for_its_output_layer():
    gpt2_small = small_config(num_layers=12, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=12,
                              num_query_groups=12, head_dim=64, vocab_size=50257, activation="gelu_tanh")
    assert round(output_layer_share(gpt2_small), 2) == 5.45  # 50257 × 768 against 12 × 768² a layer
    assert [list(stage_layers(gpt2_small, 2, r)) for r in range(2)] == [list(range(9)), [9, 10, 11]]
    assert [len(stage_layers(gpt2_small, 4, r)) for r in range(4)] == [4, 4, 3, 1]  # never fewer than one
    nemotron4_340b = small_config(num_layers=96, hidden_size=18432, ffn_hidden_size=73728, num_attention_heads=96,
                                  num_query_groups=8, head_dim=192, vocab_size=256000)
    assert [len(stage_layers(nemotron4_340b, 2, r)) for r in range(2)] == [49, 47]
    assert sum(len(stage_layers(nemotron4_340b, 8, r)) for r in range(8)) == 96


def test_query_groups_split_or_replicate_over_tensor_parallel_ranks():
    assert [local_kv_heads(small_config(num_query_groups=g), tp) for g, tp in ((2, 1), (2, 2), (2, 4), (1, 8))] \
        == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by tensor parallel size 3"):
        local_kv_heads(small_config(), 3)
    with pytest.raises(ValueError, match="num_query_groups=6 and tensor parallel size 4 must divide"):
        local_kv_heads(small_config(num_query_groups=6, num_attention_heads=24), 4)
