"""The GPU's decode path, on a CPU: bucket planning, the runner's input buffer, and decode steps through the
bucketed graph steps (model/cuda_graphs.py; run as they are where nothing can be captured). They must give the
eager step's log-probabilities and HF's greedy tokens on one rank and at tensor 2 × pipeline 2 with a lane a
stage, and the same tokens under the engine's continuous batching."""
from __future__ import annotations

from concurrent.futures import wait

import pytest
import torch

from fleetgen.model.cuda_graphs import StepInputs, context_buckets, row_buckets, smallest_fit
from fleetgen.model.generate import Generator
from fleetgen.model.load import load_stage
from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve.engine import Sampling, SequenceRequest
from tests import hf_reference as ref
from tests import server_fixtures
from tests.distributed import run_ranks
from tests.server_fixtures import make_engine, reference_greedy

NEW_TOKENS = 12
CASES = {"gpt2": ("gpt2", 2, 4), "nemotron_gqa": ("nemotron", 2, 2)}  # learned positions; rope with GQA
checkpoint, reference = server_fixtures.checkpoint, server_fixtures.reference


def test_buckets_cover_every_size_with_little_waste():
    assert row_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert row_buckets(6) == [1, 2, 4, 6] and row_buckets(1) == [1]
    assert context_buckets(512) == [64, 96, 128, 192, 256, 384, 512]
    assert context_buckets(100) == [64, 96, 100] and context_buckets(48) == [48]
    for limit in (48, 100, 512, 4096):
        buckets = context_buckets(limit)
        for context in range(1, limit + 1):
            size = smallest_fit(buckets, context)
            assert context <= size <= max(64, 1.5 * context), (limit, context, size)


def test_step_inputs_put_each_sequence_in_its_row_and_the_rest_at_scratch():
    inputs = StepInputs(rows=6, scratch=99, device=torch.device("cpu"))
    inputs.fill(torch.tensor([3, 0]), lengths=torch.tensor([10, 4]))
    inputs.set_ids(torch.tensor([7, 5]))
    ids, positions, writes = inputs.view(4)
    assert ids[:, 0].tolist() == [5, 0, 0, 7] and positions[:, 0].tolist() == [4, 0, 0, 10]
    assert writes[:, 0].tolist() == [4, 99, 99, 10]
    assert inputs.rows_of(2).tolist() == [3, 0]
    inputs.fill(torch.tensor([1]), lengths=torch.tensor([3]))  # no position or store left over
    assert inputs.view(6)[2][:, 0].tolist() == [99, 3, 99, 99, 99, 99]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = {}
    for name, (family, layers, groups) in CASES.items():
        model = ref.build(family, layers=layers, groups=groups)
        out[name] = (ref.save(model, tmp_path_factory.mktemp(name)), ref.reference_greedy(model, NEW_TOKENS))
    return out


def _graph_cases(rank: int, world_size: int, tp: int, pp: int, directories: dict) -> dict:
    torch.set_num_threads(1)
    ps = ParallelState.build(tp, pp)
    results = {}
    for name, directory in directories.items():
        stage = load_stage(ref.open_source(directory), ps, "fp32")
        eager = Generator(stage, ps, max_batch=8, max_seq_len=80, lanes=pp)
        graphs = Generator(stage, ps, max_batch=8, max_seq_len=80, lanes=pp, graphs=True)
        captured = graphs.capture_graphs()
        results[name] = (ref.decode_logprobs(eager), ref.decode_logprobs(graphs), graphs.generate_greedy(ref.PROMPTS,
                                                                                                 NEW_TOKENS),
                         captured)
    return results


def _check(per_rank: list, references: dict, graphs_per_rank: int) -> None:
    for name in per_rank[0]:
        for rank, results in enumerate(per_rank):
            eager, graphs, tokens, captured = results[name]
            assert captured == graphs_per_rank  # every bucket of every lane
            diff = (eager - graphs).abs().max().item()
            assert diff <= 1e-4, f"{name} rank {rank}: the graph step's log-probabilities differ by {diff}"
            assert tokens == references[name][1], f"{name} rank {rank}: greedy tokens differ from HF generate"


def test_the_graph_step_matches_eager_and_hf_on_one_rank(references):
    directories = {name: directory for name, (directory, _) in references.items()}
    per_rank = run_ranks(_graph_cases, 1, 1, 1, directories)
    _check(per_rank, references, len(row_buckets(8)) * len(context_buckets(80)))


@pytest.mark.slow
def test_the_graph_step_matches_eager_and_hf_at_tensor_2_by_pipeline_2(references):
    directories = {"nemotron_gqa": references["nemotron_gqa"][0]}
    per_rank = run_ranks(_graph_cases, 4, 2, 2, directories)
    _check(per_rank, references, 2 * len(row_buckets(4)) * len(context_buckets(80)))


def test_continuous_batching_through_the_graph_step_gives_the_reference_tokens(checkpoint, reference):
    """More sequences than slots, of different lengths and budgets: admissions between decode steps move rows
    and contexts across buckets, and decode steps run ahead as on a GPU."""
    engine = make_engine(checkpoint, ParallelState.single(), max_batch=3, graphs=True)
    engine.run_ahead = True  # as on a GPU: each decode step fed the last one's tokens on the device
    fed, launch = [], engine.generator.launch
    engine.generator.launch = lambda plan, feed=None: fed.append(feed is not None) or launch(plan, feed)
    texts = ["def encode(self, o):", "import re", "class JSONDecoder(object):", "x = 1", "for i in range(10):"]
    budgets = [3, 9, 5, 7, 4]
    prompts = [tuple(engine.tokenizer.encode(t)) for t in texts]
    futures = [engine.submit(SequenceRequest(p, n, Sampling(greedy=True))) for p, n in zip(prompts, budgets)]
    engine.start()
    assert engine.wait_ready(60) and len(engine.generator._graphs) == 1
    wait(futures, timeout=120)
    engine.stop()
    for prompt, budget, future in zip(prompts, budgets, futures):
        assert future.result().tokens == reference_greedy(reference, list(prompt), budget)
    assert sum(fed) > len(fed) / 2  # most steps ran ahead
