"""The shard plan (model/shard.py): which slices of which checkpoint tensors each rank reads."""
import pytest
import torch

from fleetgen.model.checkpoint.source import CheckpointError
from fleetgen.model.shard import load_shard, shard_plan, vocab_rows
from fleetgen.model.transformer import DecoderStage
from tests.checkpoint_writers import canonical_tensors, small_config
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


# ---- every rank's slice of every sharded weight, derived from the tensors' meaning, not from shard.py

class Tensors:
    """An in-memory checkpoint source: slices of the global tensors."""

    def __init__(self, config, tensors):
        self.config, self.tensors = config, tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, rows=None, cols=None):
        t = self.tensors[name][rows if rows is not None else slice(None)]
        return t if cols is None else t[:, cols]


def expected_local(config, full, tp, rank, padded_vocab, name, layer_ids):
    """Rank's local tensor under a DecoderStage parameter name, from Megatron's semantics: query heads split
    evenly over ranks, each rank holds the key/value groups its heads attend with, column-parallel weights
    split by rows, row-parallel ones by columns, the vocabulary padded with zeros then split by rows."""
    d, heads, groups = config.head_dim, config.num_attention_heads, config.num_query_groups
    mine = range(rank * heads // tp, (rank + 1) * heads // tp)
    my_groups = sorted({q // (heads // groups) for q in mine})
    ffn = slice(rank * config.ffn_hidden_size // tp, (rank + 1) * config.ffn_hidden_size // tp)

    def rows_of(t, units, size):
        return torch.cat([t[u * size:(u + 1) * size] for u in units])

    def vocab(t):
        whole = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
        return whole.chunk(tp)[rank]

    if name.startswith("layers."):
        j, local = name.split(".", 2)[1:]
        g = f"layers.{layer_ids[int(j)]}."
        kind = local.rsplit(".", 1)[1]
        if local.startswith("self_attention.linear_qkv."):
            return torch.cat([rows_of(full[g + f"self_attention.query.{kind}"], mine, d),
                              rows_of(full[g + f"self_attention.key.{kind}"], my_groups, d),
                              rows_of(full[g + f"self_attention.value.{kind}"], my_groups, d)])
        if local == "self_attention.linear_proj.weight":
            return full[g + local][:, torch.cat([torch.arange(q * d, (q + 1) * d) for q in mine])]
        if local.startswith("mlp.linear_fc1."):
            branches = ["gate", "linear_fc1"] if config.activation == "swiglu" else ["linear_fc1"]
            return torch.cat([full[g + f"mlp.{b}.{kind}"][ffn] for b in branches])
        if local == "mlp.linear_fc2.weight":
            return full[g + local][:, ffn]
        return full[g + local]  # norms, row-parallel biases: whole
    if name == "output_layer.weight" and config.tie_word_embeddings:
        return vocab(full["embedding.word_embeddings.weight"])
    if name in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
        return vocab(full[name])
    return full[name]


CONFIGS = {"plain": {}, "every-bias-swiglu-tied": dict(family="gpt2", activation="swiglu", qkv_bias=True,
                                                      proj_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                                      position_embedding="learned")}


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_rank_holds_its_slice_of_every_weight(kind, groups, tp):
    config = small_config(num_query_groups=groups, **CONFIGS[kind])  # 8 heads of 8, ffn 96
    full = canonical_tensors(config)
    source = Tensors(config, full)
    padded_vocab = config.padded_vocab_size(tp)
    rows = vocab_rows(config, source)
    for pp, pp_rank in [(1, 0), (2, 0), (2, 1)]:
        for rank in range(tp):
            stage = DecoderStage(config, rank_coordinates(rank, tp, pp_rank, pp), padded_vocab, torch.float32)
            load_shard(stage, source, rows)
            for name, param in stage.named_parameters():
                expected = expected_local(config, full, tp, rank, padded_vocab, name, stage.layer_ids)
                assert param.shape == expected.shape and torch.equal(param, expected), \
                    f"tp {tp} rank {rank}, pp rank {pp_rank}/{pp}, {groups} groups: {name}"


@pytest.mark.parametrize("name, shape, message", [
    ("embedding.word_embeddings.weight", (249, 64), r"\[249, 64\] does not cover vocab_size 250 × hidden_size 64"),
    ("embedding.word_embeddings.weight", (250, 63), r"shape \[250, 63\] does not cover"),
    ("output_layer.weight", (250,), r"output_layer.weight: shape \[250\] does not cover"),
    ("output_layer.bias", (249,), r"output_layer.bias: shape \[249\] does not cover vocab_size 250$"),
    ("output_layer.bias", (250, 1), r"output_layer.bias: shape \[250, 1\]"),
])
def test_vocabulary_tensors_that_do_not_cover_the_vocabulary_are_refused(name, shape, message):
    config = small_config(output_bias=True)
    tensors = {n: t for n, t in canonical_tensors(config).items() if not n.startswith("layers.")}
    tensors["output_layer.bias"] = torch.zeros(256)
    source = Tensors(config, tensors)
    assert vocab_rows(config, source) == {"embedding.word_embeddings.weight": 250, "output_layer.weight": 250,
                                          "output_layer.bias": 256}
    tensors[name] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=message):
        vocab_rows(config, source)
