"""The decoder's split rules (model/transformer.py): layers over pipeline stages, query groups over tensor ranks."""
import pytest

from fleetgen.model.transformer import local_kv_heads, stage_layers
from tests.checkpoint_writers import small_config


def test_layers_split_evenly_with_the_first_stages_taking_the_remainder():
    assert [list(stage_layers(3, 2, r)) for r in range(2)] == [[0, 1], [2]]
    assert [list(stage_layers(10, 4, r)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="num_layers=2 cannot fill 3 pipeline stages"):
        stage_layers(2, 3, 0)


def test_query_groups_split_or_replicate_over_tensor_parallel_ranks():
    assert [local_kv_heads(small_config(num_query_groups=g), tp) for g, tp in ((2, 1), (2, 2), (2, 4), (1, 8))] \
        == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by tensor parallel size 3"):
        local_kv_heads(small_config(), 3)
    with pytest.raises(ValueError, match="num_query_groups=6 and tensor parallel size 4 must divide"):
        local_kv_heads(small_config(num_query_groups=6, num_attention_heads=24), 4)
