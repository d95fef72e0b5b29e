"""Prefix reuse against Hugging Face at TP × PP in {1×1, 2×1, 1×2, 2×2} (test_parity.py's splits): prompts that
continue a prefix already in the paged KV cache compute only their own tokens, and still give HF's greedy tokens
and, one decode step later, log-probabilities within 1e-4 (fp32), exactly as the same prompts computed from
scratch.

The block tables come from the scheduler's allocator (model/serve/kv_blocks.py) over a cache too small to give
every slot its own blocks. A first prompt is prefilled alone; the others in one step: two find its blocks, and
one the blocks that another row of the same step writes (the samples of one request). Prefill runs one row a
micro-batch, so that row reads them after the micro-batch that writes them.
"""
from __future__ import annotations

import pytest
import torch

from fleetgen.model.generate import Generator, greedy_plan
from fleetgen.model.load import load_stage
from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve.kv_blocks import BlockManager
from tests import hf_reference as ref
from tests.hf_reference import padded_batch
from tests.distributed import run_ranks

NEW_TOKENS = 16
BLOCK = 4
PREFIX = [20 + 3 * i for i in range(13)]  # three full blocks and one token
# the last finds the third's four full blocks
PROMPTS = [PREFIX + [5, 17], PREFIX + [42], PREFIX + [8, 99, 3], PREFIX + [8, 99, 3, 9]]
CASES = {"gpt2": ("gpt2", 2, 4), "nemotron_gqa": ("nemotron", 2, 2)}  # learned positions; rotary with 2 groups


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """case -> (directory, HF greedy tokens per prompt, HF log-probabilities after prompt + first token)."""
    out = {}
    for name, (family, layers, groups) in CASES.items():
        model = ref.build(family, layers=layers, groups=groups)
        directory = ref.save(model, tmp_path_factory.mktemp(name))
        greedy = ref.reference_greedy(model, NEW_TOKENS, PROMPTS)
        after_first = ref.reference_logits(model, [p + g[:1] for p, g in zip(PROMPTS, greedy)])
        out[name] = (directory, greedy, [logits[-1].log_softmax(-1) for logits in after_first])
    return out


def paged_greedy(generator: Generator, blocks: BlockManager) -> tuple[list[list[int]], torch.Tensor, list[int]]:
    """PROMPTS through the paged cache: the first alone, the others in one prefill; then greedy decode steps of
    all four. Returns each one's tokens, the first decode step's log-probabilities [4, vocab] and each prompt's
    tokens found in the cache."""
    cached = []
    first = prefill(generator, blocks, [0], cached) + prefill(generator, blocks, [1, 2, 3], cached)
    tables = padded_tables(blocks, range(4))
    lengths = torch.tensor([len(p) for p in PROMPTS])
    tokens = [[t] for t in first]
    plan = greedy_plan("decode", torch.arange(4), torch.tensor(first)[:, None], lengths)
    plan.blocks, plan.full_logprobs = tables, True
    out = generator.step(plan)
    logprobs = out.full_logprobs[:, 0]
    for step in range(1, NEW_TOKENS):
        for row, token in enumerate(out.tokens.tolist()):
            tokens[row].append(token)
        if step == NEW_TOKENS - 1:
            break
        plan = greedy_plan("decode", torch.arange(4), out.tokens[:, None], lengths + step)
        plan.blocks = tables
        out = generator.step(plan)
    for row in range(4):
        blocks.free(row)
    return tokens, logprobs, cached


def prefill(generator: Generator, blocks: BlockManager, rows: list[int], cached: list[int]) -> list[int]:
    starts = []
    for row in rows:  # every block a row will need, taken at once: the tables stay as they are
        starts.append(blocks.admit(row, PROMPTS[row], len(PROMPTS[row]) + NEW_TOKENS))
        blocks.written(row, PROMPTS[row])  # before the step: the step writes them before a later row reads
    tokens, lengths = padded_batch([PROMPTS[row] for row in rows])
    plan = greedy_plan("prefill", torch.tensor(rows), tokens, lengths)
    plan.blocks = padded_tables(blocks, rows)
    plan.starts = torch.tensor(starts)
    cached += starts
    return generator.step(plan).tokens.tolist()


def padded_tables(blocks: BlockManager, rows) -> torch.Tensor:
    tables = [blocks.tables[row].blocks for row in rows]
    width = max(len(t) for t in tables)
    return torch.tensor([t + [-1] * (width - len(t)) for t in tables])


def _run_cases(rank: int, world_size: int, tp: int, pp: int, directories: dict) -> dict:
    torch.set_num_threads(1)
    ps = ParallelState.build(tp, pp)
    results = {}
    for name, directory in directories.items():
        stage = load_stage(ref.open_source(directory), ps, "fp32")
        generator = Generator(stage, ps, max_batch=4, max_seq_len=48, microbatch_threshold=8, num_blocks=40,
                              block_size=BLOCK)
        assert not generator.cache.identity_tables  # 4 slots × 12 blocks would need 48
        results[name] = {reuse: paged_greedy(generator, BlockManager(40, BLOCK, prefix_caching=reuse))
                         for reuse in (True, False)}
    return results


def check(tp: int, pp: int, references) -> None:
    directories = {name: directory for name, (directory, _, _) in references.items()}
    for rank, results in enumerate(run_ranks(_run_cases, tp * pp, tp, pp, directories)):
        for name, (_, want_tokens, want_logprobs) in references.items():
            for reuse, (tokens, logprobs, cached) in results[name].items():
                assert cached == ([0, 12, 12, 16] if reuse else [0, 0, 0, 0])
                assert tokens == want_tokens, f"{name} rank {rank} reuse={reuse}: greedy tokens differ from HF"
                for row, want in enumerate(want_logprobs):
                    diff = (logprobs[row, :len(want)] - want).abs().max().item()
                    assert diff <= 1e-4, f"{name} rank {rank} reuse={reuse} prompt {row}: log-probs differ by {diff}"


def test_single_rank_with_and_without_prefix_hits_matches_hf(references):
    check(1, 1, references)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_every_split_with_and_without_prefix_hits_matches_hf(references, tp, pp):
    check(tp, pp, references)
