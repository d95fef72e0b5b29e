"""Building a rank's shard and generator from a checkpoint (model/load.py): precisions, bounds, the report."""
import pytest
import torch

from fleetgen.model.generate import Generator
from fleetgen.model.load import build_generator, load_stage, startup_report
from fleetgen.model.parallel import ParallelState
from tests import hf_reference as ref
from tests.hf_reference import padded_batch, step_plan


@pytest.mark.parametrize("precision, tolerance", [("fp16", 0.1), ("bf16", 0.6)])
def test_half_precisions_stay_close_to_fp32(gpt2, precision, tolerance):
    tokens, lengths = padded_batch(ref.PROMPTS)
    logits = {}
    for p in ("fp32", precision):
        stage = load_stage(ref.open_source(gpt2[1]), ParallelState.single(), p)
        assert {t.dtype for t in stage.parameters()} == {torch.float16 if p == "fp16" else
                                                          torch.bfloat16 if p == "bf16" else torch.float32}
        plan = step_plan("prefill", [0, 1, 2], tokens, lengths.tolist(), full_logprobs=True)
        logits[p] = Generator(stage, ParallelState.single(), 4, 16).step(plan).full_logprobs
    assert logits[precision].dtype == torch.float32
    assert (logits[precision] - logits["fp32"]).abs().max() < tolerance


def test_cpu_linear_weights_are_packed_once_and_lookups_keep_a_plain_embedding(gpt2):
    stage = load_stage(ref.open_source(gpt2[1]), ParallelState.single(), "fp32")
    layer = stage.layers[0]
    packed = [layer.self_attention.linear_qkv, layer.self_attention.linear_proj, layer.mlp.linear_fc1,
              layer.mlp.linear_fc2, stage.output_layer]
    assert all(linear.weight.is_mkldnn for linear in packed)  # oneDNN's layout: no reorder on every call
    assert not stage.embedding.word_embeddings.weight.is_mkldnn  # tied to the output layer, which got a copy


def test_startup_report_names_the_shard(generator):
    line = startup_report(generator)
    assert "\n" not in line
    for part in ("gpt2", "2 layers", "hidden 64", "vocab 250 (padded 256)", "layers 0-1", "float32",
                 "layer norm torch", "KV cache"):
        assert part in line, f"{part!r} missing from {line!r}"
    # 2 (k, v) × 2 layers × (4 slots × 3 blocks of 16 positions + 1 scratch block) × 4 heads × 16 dims × 4 bytes
    assert generator.cache.bytes == 2 * 2 * (4 * 3 + 1) * 16 * 4 * 16 * 4


def test_learned_positions_bound_max_seq_len(gpt2):
    with pytest.raises(ValueError, match="max_seq_len=65 exceeds the model's 64 learned positions"):
        build_generator(ref.open_source(gpt2[1]), ParallelState.single(), "fp32", 1, 65)


def test_unknown_precision_is_refused(gpt2):
    with pytest.raises(ValueError, match="precision='fp8'"):
        load_stage(ref.open_source(gpt2[1]), ParallelState.single(), "fp8")
