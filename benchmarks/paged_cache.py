"""The paged KV cache against the static one it replaced, in one run, on the benchmark model (bench_model.py).

    python benchmarks/paged_cache.py --static DIR [--rounds 3] [--quick]

DIR holds the static cache's fleetgen as a package (DIR/fleetgen): `git archive <commit> | tar -x -C
DIR/fleetgen`. Each row runs in a process of its own, the static and paged ones taking turns round by round;
each keeps its best round (the CPU is shared). Rows, all greedy and forced to full length, in process (no
HTTP):
- decode: Generator.generate_greedy of 16 prompts of 32 tokens, 128 new tokens (throughput.py's in-process row);
  long: the same with prompts of 480 tokens and 32 new ones (a decode step gathers 15x more blocks);
- concurrency: the engine with 64 sequences of 32 + 64 tokens submitted at once: the static cache with 16
  slots of max_seq_len, the paged one with model.max_batch=64 in the same memory;
- prefix: the engine with records sharing a 512-token prefix, each with its own 32 tokens and 32 new ones:
  model.prefix_caching on and off (paged only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import wait
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as throughput.py: shared cores

HERE = Path(__file__).resolve().parent
MAX_SEQ_LEN = 1024  # GPT-2's learned positions
SLOTS = 16          # today's default model.max_batch: the static cache's memory is SLOTS × MAX_SEQ_LEN


def run_row(row: str, model_dir: Path, quick: bool) -> float:
    """In the row's own process: tokens generated per second (and, for prefix, tokens computed)."""
    import torch
    sys.path.insert(0, str(HERE))
    import bench_model
    from fleetgen.model.checkpoint.open import open_checkpoint
    from fleetgen.model.load import build_generator
    from fleetgen.model.parallel import ParallelState
    from fleetgen.model.serve.engine import Engine, Sampling, SequenceRequest

    torch.set_num_threads(2)
    source, ps = open_checkpoint(model_dir), ParallelState.single()
    kind, _, variant = row.partition(":")
    if kind in ("decode", "long"):
        length, new = (32, 16 if quick else 128) if kind == "decode" else (480, 8 if quick else 32)
        prompts = bench_model.token_ids(model_dir, bench_model.prompts(16, length))
        generator = build_generator(source, ps, "fp32", SLOTS, MAX_SEQ_LEN)
        generator.generate_greedy(prompts[:2], 4)  # warm
        started, cpu = time.perf_counter(), time.process_time()
        generator.generate_greedy(prompts, new)
        tokens = 16 * new
        # CPU time is less moved by the other processes on shared cores than wall time
        print(json.dumps({"cpu_ms_per_token": round(1000 * (time.process_time() - cpu) / tokens, 2)}))
        return tokens / (time.perf_counter() - started)
    if kind == "concurrency":
        clients, new = (16, 16) if quick else (64, 64)
        prompts = bench_model.token_ids(model_dir, bench_model.prompts(clients, 32))
        options = {} if variant == "static" else {"kv_cache_gb": _static_gb(source.config)}
        generator = build_generator(source, ps, "fp32", SLOTS if variant == "static" else clients, MAX_SEQ_LEN,
                                    **options)
        engine = Engine(generator, source.tokenizer(), ps, source.config)
    else:  # prefix
        records, new = (16, 8) if quick else (64, 32)
        head = bench_model.token_ids(model_dir, bench_model.prompts(1, 512, seed=1))[0]
        prompts = [head + tail for tail in bench_model.token_ids(model_dir, bench_model.prompts(records, 32))]
        generator = build_generator(source, ps, "fp32", SLOTS, MAX_SEQ_LEN)
        engine = Engine(generator, source.tokenizer(), ps, source.config, prefix_caching=variant == "on")
    engine.warm_up()
    engine.start()
    greedy = Sampling(greedy=True)
    started = time.perf_counter()
    futures = [engine.submit(SequenceRequest(tuple(p), new, greedy)) for p in prompts]
    wait(futures)
    elapsed = time.perf_counter() - started
    engine.stop()
    assert all(len(f.result().tokens) == new for f in futures)
    if kind == "prefix":
        print(json.dumps({"computed": engine.blocks.computed_tokens, "reused": engine.blocks.hit_tokens}))
    return len(prompts) * new / elapsed


def _static_gb(config) -> float:
    """GiB of SLOTS × MAX_SEQ_LEN positions of keys and values in fp32."""
    return 2 * config.num_layers * SLOTS * MAX_SEQ_LEN * config.num_query_groups * config.head_dim * 4 / 2**30


ROWS = ["decode:static", "decode:paged", "long:static", "long:paged", "concurrency:static", "concurrency:paged",
        "prefix:off", "prefix:on"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--static", type=Path, help="a directory holding the static cache's fleetgen package")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", default="decode,long,concurrency,prefix", help="which kinds of rows, by name")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a row's own process
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/fleetgen/bench/gpt2-small")
    args = parser.parse_args()
    if args.row:
        print(json.dumps({"tokens_per_s": run_row(args.row, args.model, args.quick)}))
        return
    sys.path.insert(0, str(HERE))
    import bench_model
    bench_model.gpt2_small(args.model)
    best: dict[str, float] = {}
    extra: dict[str, dict] = {}
    rows = [row for row in ROWS if row.partition(":")[0] in args.rows.split(",")]
    for _ in range(args.rounds):
        for row in rows:
            env = dict(os.environ)
            if row.endswith(":static"):
                env["PYTHONPATH"] = str(args.static)
            command = [sys.executable, __file__, "--row", row, "--model", str(args.model)] + \
                (["--quick"] if args.quick else [])
            lines = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout.splitlines()
            results = [json.loads(line) for line in lines if line.startswith("{")]
            best[row] = max(best.get(row, 0.0), results[-1]["tokens_per_s"])
            if len(results) > 1:
                extra[row] = results[0]
            print(f"{row:20s} {results[-1]['tokens_per_s']:8.1f} tokens/s {extra.get(row, '')}", flush=True)
    print("best of each:")
    for row in rows:
        print(f"  {row:20s} {best[row]:8.1f} tokens/s")
    for name, (a, b) in {"decode paged/static": ("decode:paged", "decode:static"),
                         "long decode paged/static": ("long:paged", "long:static"),
                         "64 clients paged / 16 slots static": ("concurrency:paged", "concurrency:static"),
                         "prefix caching on/off": ("prefix:on", "prefix:off")}.items():
        if a in best:
            print(f"  {name}: {best[a] / best[b]:.2f}x")


if __name__ == "__main__":
    main()
