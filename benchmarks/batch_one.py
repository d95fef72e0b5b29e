"""Where a batch-1 decode step's time goes, beside CTranslate2's whole step.

    python benchmarks/batch_one.py [--new 64] [--rounds 4]

At batch 1 a decode step reads every weight for one token, so its linear layers set its pace. On the benchmark
model (bench_model.py) and one 32-token prompt, taking turns round by round (references.interleaved), this times
per generated token: fleetgen's whole step (Generator.generate_greedy); the step's linear layers alone, as
fleetgen runs them (oneDNN, weights packed at load); the same products through torch's default GEMM (MKL on
Intel) on plain copies of the same weights, the quickest one-row product torch has here; and CTranslate2's
whole step (generate_batch). Prints milliseconds a token and each row over CTranslate2's step.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as throughput.py: shared cores

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_model  # noqa: E402
import references  # noqa: E402


def linear_weights(generator) -> list[torch.Tensor]:
    """The weight of every linear layer of the stage, the output layer's included."""
    from fleetgen.model.layers import ColumnParallelLinear, RowParallelLinear

    return [m.weight for m in generator.stage.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def products_only(weights: list[torch.Tensor], product) -> Callable[[list[list[int]], int], None]:
    """A runner in references' shape: `new` times, one row through every weight."""
    rows = [torch.randn(1, w.shape[1]) for w in weights]

    def run(prompts: list[list[int]], new: int) -> None:
        for _ in range(new * len(prompts)):
            for x, w in zip(rows, weights):
                product(x, w)
    return run


def main() -> None:
    from fleetgen.model.checkpoint.hf import HFSource
    from fleetgen.model.layers import linear
    from fleetgen.model.load import build_generator
    from fleetgen.model.parallel import ParallelState

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    model_dir = bench_model.gpt2_small(Path(".fleetgen/bench/gpt2-small"))
    prompt = bench_model.token_ids(model_dir, bench_model.prompts(1, bench_model.PROMPT_TOKENS))
    generator = build_generator(HFSource(model_dir), ParallelState.single(), "fp32", 1,
                                bench_model.PROMPT_TOKENS + args.new)
    packed = linear_weights(generator)
    plain = [w.to_dense() if w.is_mkldnn else w for w in packed]
    runners = {"fleetgen, whole step": generator.generate_greedy,
               "fleetgen's linear layers alone (oneDNN, packed)": products_only(packed, linear),
               "the same products through MKL, plain weights": products_only(plain, F.linear),
               "ctranslate2, whole step": references.ctranslate2_runner(model_dir, torch.get_num_threads())}
    if runners["ctranslate2, whole step"] is None:
        raise SystemExit("ctranslate2 is not installed: pip install -e '.[bench]'")
    best = references.interleaved({name: references.one_round(run, prompt, args.new)
                                   for name, run in runners.items()}, args.rounds)
    reference = 1000 / best["ctranslate2, whole step"]
    print(f"batch 1, {len(packed)} linear layers a step, {torch.get_num_threads()} threads, best of {args.rounds}:")
    for name, tokens_per_s in best.items():
        ms = 1000 / tokens_per_s
        print(f"  {name}: {ms:.1f} ms a token ({ms / reference:.2f}x ctranslate2's step)")


if __name__ == "__main__":
    main()
