"""The decode step under torch.compile (model.compile=true) keeps the parity matrix: log-probabilities within
1e-4 of the eager step's and greedy tokens identical to HF's, on one rank and at tensor 2 × pipeline 2
(collectives inside the compiled step), and stores into the KV cache in place. The eager step is what
tests/test_parity.py checks; the CPU default is eager (model.compile=auto)."""
from __future__ import annotations

import math

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fleetgen.model.generate import Generator, greedy_plan
from fleetgen.model.load import load_stage
from fleetgen.model.parallel import ParallelState
from tests import hf_reference as ref
from tests.distributed import run_ranks
from tests.test_parity import padded_batch

NEW_TOKENS = 12
CASES = {"gpt2": ("gpt2", 2, 4), "nemotron_gqa": ("nemotron", 2, 2)}  # learned positions; rope with GQA


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = {}
    for name, (family, layers, groups) in CASES.items():
        model = ref.build(family, layers=layers, groups=groups)
        directory = ref.save(model, tmp_path_factory.mktemp(name))
        out[name] = (directory, ref.reference_logits(model), ref.reference_greedy(model, NEW_TOKENS))
    return out


def _compiled_cases(rank: int, world_size: int, tp: int, pp: int, directories: dict) -> dict:
    torch.set_num_threads(1)
    ps = ParallelState.build(tp, pp)
    results = {}
    for name, directory in directories.items():
        stage = load_stage(ref.open_source(directory), ps, "fp32")
        eager = Generator(stage, ps, max_batch=4, max_seq_len=48)
        compiled = Generator(stage, ps, max_batch=4, max_seq_len=48, compile=True)
        results[name] = (ref.decode_logprobs(eager), ref.decode_logprobs(compiled),
                         compiled.generate_greedy(ref.PROMPTS, NEW_TOKENS))
    return results


def _check(per_rank: list, references: dict) -> None:
    for name in per_rank[0]:
        want_tokens = references[name][2]
        for rank, results in enumerate(per_rank):
            eager, compiled, tokens = results[name]
            diff = (eager - compiled).abs().max().item()
            assert diff <= 1e-4, f"{name} rank {rank}: compiled decode log-probabilities differ from eager by {diff}"
            assert tokens == want_tokens, f"{name} rank {rank}: compiled greedy tokens differ from HF generate"


@pytest.mark.slow
def test_compiled_decode_matches_eager_and_hf_on_one_rank(references):
    directories = {name: directory for name, (directory, _, _) in references.items()}
    per_rank = run_ranks(_compiled_cases, 1, 1, 1, directories)
    assert set(per_rank[0]) == set(CASES)
    _check(per_rank, references)


@pytest.mark.slow
def test_compiled_decode_matches_eager_and_hf_at_tensor_2_by_pipeline_2(references):
    # the rope + grouped-query case only: compiling costs minutes when 4 ranks share 2 cores
    directories = {"nemotron_gqa": references["nemotron_gqa"][0]}
    per_rank = run_ranks(_compiled_cases, 4, 2, 2, directories)
    assert [set(results) for results in per_rank] == [{"nemotron_gqa"}] * 4
    _check(per_rank, references)


def _compiled_decode_code(rank: int, world_size: int, directory) -> tuple[list[str], tuple[int, ...], int]:
    """The code inductor generates for a decode step of one lane of two, the lane's cache shape, and how many
    stores into the cache it makes."""
    torch.set_num_threads(1)
    ps = ParallelState.build(1, 1)
    generator = Generator(load_stage(ref.open_source(directory), ps, "fp32"), ps, max_batch=6, max_seq_len=45,
                          compile=True, lanes=2)
    tokens, lengths = padded_batch(ref.PROMPTS)
    slots = torch.arange(len(ref.PROMPTS)) + generator.lanes[1].start  # the second lane: a view of the cache
    first = generator.step(greedy_plan("prefill", slots, tokens, lengths)).tokens
    _, code = run_and_get_code(generator.step, greedy_plan("decode", slots, first[:, None], lengths))
    stores = sum(source.count("index_put") + source.count("scatter") for source in code)
    return code, tuple(generator._lane_caches[1].k.shape), stores


@pytest.mark.slow
def test_the_compiled_decode_step_leaves_the_kv_cache_to_eager_attention(references):
    """Compiled code never touches the cache: traced as indexing, a store into a view of the cache was
    functionalized and the compiled step copied each layer's whole cache and then the lane's, every step (a
    CUDA graph's whole memory traffic on a GPU). Only the parts of a layer around attention are compiled; a
    loop over that many elements would be such a copy."""
    code, lane_shape, stores = run_ranks(_compiled_decode_code, 1, references["nemotron_gqa"][0])[0]
    layers = lane_shape[0]
    layer_cache, lane_cache = math.prod(lane_shape[1:]), math.prod(lane_shape)
    assert code
    for size in (layer_cache, lane_cache):
        assert not any(f"{size}L" in source for source in code), \
            f"the compiled decode step loops over {size} elements: a copy of the KV cache"
    assert layers and stores == 0, f"the compiled parts store into the cache {stores} times"
