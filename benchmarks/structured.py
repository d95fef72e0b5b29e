"""What structured output costs: tokens per second at 16 rows with and without a JSON-schema constraint, on the
same model in the same run, greedy and sampled.

    python benchmarks/structured.py [--new 64] [--rounds 3]

The engine in process over bench_model.py's GPT-2-small-shaped random weights (vocab 50257), 16 sequences at
once, 32-token prompts. Unconstrained rows run to their full length (the end-of-document token banned); a
constrained row follows a schema that cannot be complete sooner (an object holding 100 strings at least), so both
make the same number of tokens. The constrained steps add: the leader filling 16 rows of llguidance's bitmask,
the mask in the plan, the logits masked on the device, and (greedy) the full logits where an unconstrained
greedy step takes only each row's argmax. Rounds take turns, each kind keeps its best (the CPU is shared).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as throughput.py: no spinning threads on shared cores

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/: make_engine

import bench_model  # noqa: E402
from fleetgen.model import constraints  # noqa: E402
from fleetgen.model.parallel import ParallelState  # noqa: E402
from fleetgen.model.serve.engine import Sampling, SequenceRequest  # noqa: E402
from tests.server_fixtures import make_engine  # noqa: E402

ROWS = 16
SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}, "minItems": 100}},
          "required": ["notes"], "additionalProperties": False}  # cannot be complete within a few hundred tokens


class Timed:
    """Wraps the leader's Grammars.bitmask: seconds spent filling masks, and in how many steps."""

    def __init__(self, grammars):
        self.seconds, self.steps, self._bitmask = 0.0, 0, grammars.bitmask
        grammars.bitmask = self

    def __call__(self, matchers):
        started = time.perf_counter()
        mask = self._bitmask(matchers)
        if mask is not None:
            self.seconds, self.steps = self.seconds + time.perf_counter() - started, self.steps + 1
        return mask


def run(engine, prompts: list[tuple], new: int, greedy: bool, constrained: bool) -> tuple[int, float]:
    """Tokens generated and seconds, for ROWS sequences at once."""
    constraint = constraints.json_schema(SCHEMA) if constrained else None
    started = time.perf_counter()
    futures = [engine.submit(SequenceRequest(prompt, new, Sampling(greedy=greedy, seed=None if greedy else i,
                                                                   min_tokens=new), constraint=constraint))
               for i, prompt in enumerate(prompts)]
    tokens = sum(len(f.result(600).tokens) for f in futures)
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64, help="new tokens a sequence")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(".fleetgen/bench"))
    args = parser.parse_args()
    model_dir = bench_model.gpt2_small(args.workdir.resolve() / "gpt2-small")
    engine = make_engine(model_dir, ParallelState.single(), max_batch=ROWS,
                         max_seq_len=bench_model.PROMPT_TOKENS + args.new)
    engine.warm_up()
    engine.start()
    prompts = [tuple(p) for p in bench_model.token_ids(model_dir, bench_model.prompts(ROWS,
                                                                                       bench_model.PROMPT_TOKENS))]
    kinds = [(greedy, constrained) for greedy in (True, False) for constrained in (False, True)]
    best: dict = {}
    try:
        run(engine, prompts, 8, True, True)  # llguidance's tokenizer is built at the first constrained request
        masks = Timed(engine.grammars)
        for _ in range(args.rounds):
            for kind in kinds:
                tokens, seconds = run(engine, prompts, args.new, *kind)
                if kind not in best or tokens / seconds > best[kind][0] / best[kind][1]:
                    best[kind] = (tokens, seconds)
    finally:
        engine.stop()
    print(f"{ROWS} rows, {args.new} new tokens each, best of {args.rounds} rounds, torch threads "
          f"{__import__('torch').get_num_threads()}")
    for greedy in (True, False):
        free, bound = (best[(greedy, c)] for c in (False, True))
        rates = [t / s for t, s in (free, bound)]
        print(f"{'greedy' if greedy else 'sampled':8} unconstrained {rates[0]:7.1f} tok/s ({free[0]} tokens), "
              f"JSON schema {rates[1]:7.1f} tok/s ({bound[0]} tokens): {100 * (1 - rates[1] / rates[0]):+.1f}% "
              f"cost")
    per_step = masks.seconds / masks.steps
    print(f"the leader filled {ROWS} rows' masks in {1000 * per_step:.2f} ms a step (mean of {masks.steps} steps): "
          f"{100 * per_step / (ROWS / (best[(True, False)][0] / best[(True, False)][1])):.1f}% of an "
          f"unconstrained greedy step")


if __name__ == "__main__":
    main()
