"""The shard plan (model/shard.py): which slices of which checkpoint tensors each rank reads."""
from fleetgen.model.shard import shard_plan
from tests.checkpoint_writers import small_config
from tests.distributed import rank_coordinates


def _qkv(plan, layer=0):
    return [(p.name.split(".")[-2], p.rows.start, p.rows.stop, p.dst.start)
            for p in plan[f"layers.{layer}.self_attention.linear_qkv.weight"]]


def test_shard_plan_gives_each_rank_its_heads_and_groups():
    config = small_config()  # 8 heads, 2 groups, head_dim 8
    rank1 = shard_plan(config, rank_coordinates(1, 2), 256, range(0, 4), {"embedding.word_embeddings.weight": 250,
                                                              "output_layer.weight": 250})
    assert _qkv(rank1) == [("query", 32, 64, 0), ("key", 8, 16, 32), ("value", 8, 16, 40)]
    rank3 = shard_plan(config, rank_coordinates(3, 4), 512, range(0, 4), {"embedding.word_embeddings.weight": 250,
                                                             "output_layer.weight": 250})
    # TP 4 > 2 groups: ranks 2 and 3 both serve group 1
    assert _qkv(rank3) == [("query", 48, 64, 0), ("key", 8, 16, 16), ("value", 8, 16, 24)]
    fc2 = rank3["layers.0.mlp.linear_fc2.weight"][0]
    assert (fc2.cols.start, fc2.cols.stop) == (72, 96)


def test_shard_plan_pads_the_vocabulary_and_reads_tied_embeddings_on_the_last_stage():
    config = small_config(family="gpt2", tie_word_embeddings=True, activation="swiglu")
    rows = {"embedding.word_embeddings.weight": 250}
    padded = config.padded_vocab_size(2, 250)
    assert padded == 256
    plans = [shard_plan(config, rank_coordinates(r, 2, 1, 2), padded, range(2, 4), rows) for r in range(2)]
    # rows 0-127 on TP rank 0, 128-249 on rank 1 whose last 6 rows stay zero padding
    assert [[(p.name, p.rows, p.dst) for p in plan["output_layer.weight"]] for plan in plans] == [
        [("embedding.word_embeddings.weight", slice(0, 128), slice(0, 128))],
        [("embedding.word_embeddings.weight", slice(128, 250), slice(0, 122))]]
    fc1 = [(p.name, p.rows, p.dst) for p in plans[1]["layers.0.mlp.linear_fc1.weight"]]
    assert fc1 == [("layers.2.mlp.gate.weight", slice(48, 96), slice(0, 48)),
                   ("layers.2.mlp.linear_fc1.weight", slice(48, 96), slice(48, 96))]
    whole = shard_plan(config, rank_coordinates(), 256, range(0, 4), rows)
    assert "output_layer.weight" not in whole  # one tied parameter serves both ends
    assert "embedding.word_embeddings.weight" in whole and "layers.3.mlp.linear_fc2.weight" in whole
