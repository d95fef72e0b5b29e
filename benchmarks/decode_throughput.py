"""Greedy decoding throughput: fleetgen's decoder against transformers' generate on the same weights.

Both run in this one process on the same CPU threads, one after the other, several rounds; the ratio of
medians is what to read (absolute tokens/s vary with the machine and its load).

    python benchmarks/decode_throughput.py [--hidden 256 --layers 4 --batch 8 --new 64]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fleetgen.model.checkpoint.hf import HFSource
from fleetgen.model.load import build_generator
from fleetgen.model.parallel import ParallelState


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.prompt + args.new,
                                           n_embd=args.hidden, n_layer=args.layers, n_head=args.heads)).eval()
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt))
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        generator = build_generator(HFSource(tmp), ParallelState.single(), "fp32", args.batch,
                                    args.prompt + args.new)

    def ours():
        generator.generate_greedy(prompts.tolist(), args.new)

    def theirs():
        with torch.no_grad():
            # min_new_tokens: never stop early, so both produce exactly args.new tokens per row
            reference.generate(prompts, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                               pad_token_id=0)

    timings = {"fleetgen": [], "transformers": []}
    for _ in range(args.rounds):
        for name, run in (("fleetgen", ours), ("transformers", theirs)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    tokens = args.batch * args.new
    print(f"GPT-2 hidden {args.hidden}, {args.layers} layers, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        print(f"  {name:12} {tokens / median:9.1f} tokens/s (median {median:.3f} s)")
    ratio = statistics.median(timings["transformers"]) / statistics.median(timings["fleetgen"])
    print(f"  fleetgen / transformers speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
