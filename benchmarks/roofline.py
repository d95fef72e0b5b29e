"""Decode against the memory roofline: a GPT-2B-001-shaped decoder (random bf16 weights) on one GPU.

    python benchmarks/roofline.py [--device cuda] [--batches 1 64] [--new 128]

Each decode step reads every weight and each row's keys and values once; bytes read per step ÷ the step time
is the achieved bandwidth, reported against the device's memory bandwidth (--bandwidth-gbs; H100 SXM 3350,
H200 4800). The steps are the server's own: the runner's decode graphs (captured as the engine's warm-up does)
and one copy of the tokens to the host a step. Runs on CPU too (--device cpu --layers 2) as a smoke test.
"""
from __future__ import annotations

import argparse
import time

import torch

from fleetgen.model.config import ModelConfig
from fleetgen.model.generate import Generator
from fleetgen.model.load import dtype_of
from fleetgen.model.parallel import ParallelState
from fleetgen.model.transformer import DecoderStage

PROMPT_TOKENS = 32


def gpt2b_config(layers: int = 24) -> ModelConfig:
    """GPT-2B-001's architecture (its model_config.yaml)."""
    return ModelConfig(family="nemo_gpt", num_layers=layers, hidden_size=2048, ffn_hidden_size=5440,
                       num_attention_heads=16, num_query_groups=16, head_dim=128, vocab_size=256000,
                       max_position_embeddings=4096, position_embedding="rope", rotary_percent=0.5,
                       normalization="layernorm1p", activation="swiglu", qkv_bias=False, proj_bias=False,
                       mlp_bias=False, tie_word_embeddings=False, eos_id=3)


def random_generator(config: ModelConfig, precision: str, device: torch.device, max_batch: int,
                     max_seq_len: int, compile: bool) -> Generator:
    """Random weights, warmed up and with its decode graphs captured (on a GPU) as the engine does; the
    seconds the capture took are in .capture_s."""
    ps = ParallelState.single(device)
    dtype = dtype_of(precision)
    stage = DecoderStage(config, ps, config.padded_vocab_size(1), dtype)
    with torch.no_grad():
        for param in stage.parameters():
            param.normal_(0, 0.02)
    generator = Generator(stage.eval(), ps, max_batch, max_seq_len, compile=compile)
    generator.generate_greedy([[1, 2]], 2)  # an eager prefill and decode first, as Engine.warm_up
    started = time.perf_counter()
    generator.capture_graphs()
    _sync(device)
    generator.capture_s = time.perf_counter() - started
    return generator


def measure(generator: Generator, batch: int, new: int, bandwidth_gbs: float) -> dict:
    prompts = torch.randint(0, generator.config.vocab_size, (batch, PROMPT_TOKENS)).tolist()
    generator.generate_greedy(prompts, new)  # compiles every bucket the timed run meets
    _sync(generator.ps.device)
    started = time.perf_counter()
    generator.generate_greedy(prompts, new)
    _sync(generator.ps.device)
    seconds = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in generator.stage.parameters())  # tied ones once
    if not generator.config.tie_word_embeddings:  # a lookup reads a few rows of the input embedding, not all
        table = generator.stage.embedding.word_embeddings.weight
        weights -= table.numel() * table.element_size()
    per_token = generator.cache.k[0, 0, 0].numel() * generator.cache.k.element_size() * 2 * \
        generator.cache.k.shape[0]  # keys and values of one position, every layer
    mean_context = PROMPT_TOKENS + new / 2
    bytes_per_step = weights + batch * mean_context * per_token
    achieved = bytes_per_step * new / seconds / 1e9
    return {"batch": batch, "tokens_per_s": batch * new / seconds, "achieved_gbs": achieved,
            "roofline_fraction": achieved / bandwidth_gbs, "step_ms": 1e3 * seconds / new,
            "graph_ms": _graph_ms(generator, batch, PROMPT_TOKENS + new // 2)}


def _graph_ms(generator: Generator, rows: int, context: int, replays: int = 50):
    """Milliseconds of the decode graph alone (GPU time, no host work between steps), or None without graphs:
    the step's time over this is what the host adds."""
    graphs = generator._graphs[0]
    if graphs is None or generator.ps.device.type != "cuda":
        return None
    bucket = graphs.bucket(rows, context)
    graphs.replay(*bucket)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graphs.replay(*bucket)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def kernel_profile(generator: Generator, batch: int = 1, steps: int = 4, top: int = 30) -> list[dict]:
    """The GPU kernels of a few eager decode steps (the graphs set aside: the same kernels, one by one) by
    total time: where a decode step's time goes, for the next optimisation."""
    from torch.profiler import ProfilerActivity, profile

    graphs, generator._graphs = generator._graphs, [None] * len(generator._graphs)
    try:
        prompts = [[1] * PROMPT_TOKENS] * batch
        generator.generate_greedy(prompts, 2)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generator.generate_greedy(prompts, steps + 1)
            _sync(generator.ps.device)
    finally:
        generator._graphs = graphs
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return [{"kernel": e.key[:120], "calls_per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
            for e in events]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0)
    parser.add_argument("--compile", choices=("on", "off"), default="off")
    args = parser.parse_args()
    generator = random_generator(gpt2b_config(args.layers), args.precision, torch.device(args.device),
                                 max(args.batches), PROMPT_TOKENS + args.new, args.compile == "on")
    print(f"GPT-2B-001 shape, {args.layers} layers, {args.precision}, {args.device}, compile {args.compile}, "
          f"{PROMPT_TOKENS}-token prompts, {args.new} new tokens; roofline {args.bandwidth_gbs:.0f} GB/s; "
          f"graphs captured in {generator.capture_s:.1f} s")
    for batch in args.batches:
        r = measure(generator, batch, args.new, args.bandwidth_gbs)
        graph = f", graph alone {r['graph_ms']:.3f} ms" if r["graph_ms"] is not None else ""
        print(f"  batch {batch:3}: {r['tokens_per_s']:9.1f} tokens/s, {r['achieved_gbs']:7.1f} GB/s, "
              f"{100 * r['roofline_fraction']:5.1f}% of roofline; step {r['step_ms']:.3f} ms{graph}")


if __name__ == "__main__":
    main()
