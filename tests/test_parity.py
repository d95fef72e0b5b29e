"""fleetgen's decoder against Hugging Face, for every family, at TP × PP in {1×1, 2×1, 1×2, 2×2}.

Each TP × PP runs as real processes joined by gloo, spawned once, checking every case inside: logits of a
batch of different-length prompts within 1e-4 of HF's (each prompt alone), and 32 greedy tokens identical
to HF generate. The cases cover GQA with 2 groups (split over TP=2), a single group at TP=2 (replicated KV)
and 3 layers over 2 stages (uneven split). Prefill is micro-batched one row at a time so stages overlap.
"""
from __future__ import annotations

import pytest
import torch

from fleetgen.model.generate import Generator, greedy_plan
from fleetgen.model.load import load_stage
from fleetgen.model.parallel import ParallelState
from tests import hf_reference as ref
from tests.hf_reference import padded_batch
from tests.distributed import run_ranks

NEW_TOKENS = 32
CASES = {  # name: (family, layers, query groups)
    "gpt2": ("gpt2", 2, 4),
    "gptj": ("gptj", 3, 4),
    "nemo_gpt": ("nemo_gpt", 2, 4),
    "nemotron_gqa": ("nemotron", 2, 2),
    "nemotron_one_group": ("nemotron", 3, 1),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """case -> (saved directory, reference logits per prompt, reference greedy tokens per prompt)."""
    out = {}
    for name, (family, layers, groups) in CASES.items():
        model = ref.build(family, layers=layers, groups=groups)
        directory = ref.save(model, tmp_path_factory.mktemp(name))
        out[name] = (directory, ref.reference_logits(model), ref.reference_greedy(model, NEW_TOKENS))
    return out


def _run_cases(rank: int, world_size: int, tp: int, pp: int, directories: dict) -> dict:
    torch.set_num_threads(1)
    ps = ParallelState.build(tp, pp)
    results = {}
    for name, directory in directories.items():
        stage = load_stage(ref.open_source(directory), ps, "fp32")
        generator = Generator(stage, ps, max_batch=4, max_seq_len=48, microbatch_threshold=8)
        tokens, lengths = padded_batch(ref.PROMPTS)
        plan = greedy_plan("prefill", torch.arange(len(ref.PROMPTS)), tokens, lengths)
        plan.full_logprobs = True
        logprobs = generator.step(plan).full_logprobs
        results[name] = (logprobs, generator.generate_greedy(ref.PROMPTS, NEW_TOKENS), list(stage.layer_ids))
    return results


def check_matrix(tp: int, pp: int, references) -> dict[str, list[list[int]]]:
    """Every case on TP × PP ranks against HF; returns each case's layers per stage."""
    directories = {name: directory for name, (directory, _, _) in references.items()}
    per_rank = run_ranks(_run_cases, tp * pp, tp, pp, directories)
    for name, (_, want_logits, want_tokens) in references.items():
        for rank, results in enumerate(per_rank):
            logprobs, tokens, _ = results[name]
            for row, want in enumerate(want_logits):
                diff = (logprobs[row, :len(want)] - want.log_softmax(-1)).abs().max().item()
                assert diff <= 1e-4, f"{name} rank {rank} prompt {row}: log-probabilities differ by {diff}"
            assert tokens == want_tokens, f"{name} rank {rank}: greedy tokens differ from HF generate"
    return {name: [results[name][2] for results in per_rank[::tp]] for name in references}


@pytest.mark.slow
def test_single_rank_matches_hf(references):
    layers = check_matrix(1, 1, references)
    assert layers["gptj"] == [[0, 1, 2]]


@pytest.mark.slow
def test_tensor_parallel_2_matches_hf(references):
    check_matrix(2, 1, references)


@pytest.mark.slow
def test_pipeline_parallel_2_matches_hf_with_uneven_split(references):
    layers = check_matrix(1, 2, references)
    assert layers["gptj"] == [[0, 1], [2]] and layers["gpt2"] == [[0], [1]]


@pytest.mark.slow
def test_tensor_2_by_pipeline_2_matches_hf(references):
    layers = check_matrix(2, 2, references)
    assert layers["nemotron_one_group"] == [[0, 1], [2]]
