"""Where a tensor- or pipeline-parallel decode step spends its time, without a server in the way.

    python benchmarks/decode_scaling.py [--new 64] [--batch 16] [--threads 1]

Runs the serving engine (model/serve/engine.py, built as the worker builds it: one lane a pipeline stage) on
the benchmark model (bench_model.py) as 1 rank, 2 replicas, tensor 2 and pipeline 2, each rank a process of its
own over gloo with --threads torch threads. Each replica's leader submits --batch greedy sequences of --new
tokens at once. Two replicas never communicate: what any two-process layout could reach here. Reports
per layout: tokens/s, its ratio to 1 rank, and on every rank the collectives per generated token of a
sequence (calls, and seconds inside them: time spent waiting for the other ranks shows up there), and the
seconds in its own share of the steps (its layers, sampling on the last stage; a later stage's receive of its
input counts here too). The HTTP
server's share of the CPU is what remains between this and benchmarks/throughput.py's scaling rows.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import socket
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as throughput.py: shared cores

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import bench_model  # noqa: E402

# (tensor, pipeline, replicas); two replicas are two processes that never communicate: the ceiling of any
# two-process layout on this machine, measured in the same run
LAYOUTS = {"1 rank": (1, 1, 1), "2 replicas": (1, 1, 2), "tensor 2": (2, 1, 1), "pipeline 2": (1, 2, 1)}
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "recv", "isend", "irecv")


def count_collectives(counts: collections.Counter, seconds: collections.Counter) -> None:
    """Wrap torch.distributed's collectives (as the decoder calls them, dist.NAME), the shared-memory
    all-reduce and the rank's own share of each step to count and time them."""
    from fleetgen.model.generate import Generator
    from fleetgen.model.local_reduce import SharedMemoryReduce

    labels = {(dist, name): name for name in COLLECTIVES}
    labels[SharedMemoryReduce, "all_reduce"] = "shared-memory all_reduce"
    labels[Generator, "_run"] = "own share of steps"  # this rank's layers (and sampling), its sends included
    for (owner, name), label in labels.items():
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, _label=label, _original=original, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                counts[_label] += 1
                seconds[_label] += time.perf_counter() - started
        setattr(owner, name, timed)


def rank_main(rank: int, world: int, layout: tuple[int, int, int], port: int, model_dir: str, batch: int, new: int,
              threads: int, results) -> None:
    from fleetgen.model.checkpoint.hf import HFSource
    from fleetgen.model.load import build_generator
    from fleetgen.model.parallel import ParallelState
    from fleetgen.model.serve.engine import Engine, Sampling, SequenceRequest

    torch.set_num_threads(threads)
    ps = ParallelState.single()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ps = ParallelState.build(*layout[:2])
    source = HFSource(Path(model_dir))
    generator = build_generator(source, ps, "fp32", batch, bench_model.PROMPT_TOKENS + new, lanes=ps.pp_size)
    engine = Engine(generator, source.tokenizer(), ps, source.config)
    engine.warm_up()
    counts, seconds = collections.Counter(), collections.Counter()
    count_collectives(counts, seconds)
    if ps.world_rank != ps.first_rank:
        engine.follow()
        results.put((rank, None, {k: (counts[k] / new, seconds[k] / new) for k in counts}))
    else:
        prompts = bench_model.token_ids(Path(model_dir), bench_model.prompts(batch, bench_model.PROMPT_TOKENS))
        full_length = Sampling(greedy=True, min_tokens=new)  # end-of-document banned: every row runs to the end
        started = time.perf_counter()
        engine.start()
        futures = [engine.submit(SequenceRequest(tuple(p), new, full_length)) for p in prompts]
        generated = sum(len(f.result().tokens) for f in futures)
        wall = time.perf_counter() - started
        engine.stop()
        results.put((rank, generated / wall, {k: (counts[k] / new, seconds[k] / new) for k in counts}))
    if world > 1:
        dist.destroy_process_group()


def run_layout(layout: tuple[int, int, int], model_dir: Path, batch: int, new: int, threads: int) -> list[tuple]:
    world = layout[0] * layout[1] * layout[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=rank_main, args=(r, world, layout, port, str(model_dir), batch, new, threads,
                                                     results)) for r in range(world)]
    for p in procs:
        p.start()
    found = sorted(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads a rank")
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    model_dir = bench_model.gpt2_small(Path(".fleetgen/bench/gpt2-small"))
    base = None
    for name in args.layouts:
        ranks = run_layout(LAYOUTS[name], model_dir, args.batch, args.new, args.threads)
        speed = sum(tokens_per_s for _, tokens_per_s, _ in ranks if tokens_per_s)  # every replica's leader
        base = base or (speed if name == "1 rank" else None)
        ratio = f" ({speed / base:.2f}x 1 rank)" if base else ""
        print(f"{name}: {speed:.1f} tokens/s{ratio}")
        for rank, _, per_step in ranks:
            detail = ", ".join(f"{op} {calls:.0f}× {1000 * s:.1f} ms" for op, (calls, s) in sorted(per_step.items()))
            print(f"  rank {rank}, a token: {detail or 'no collectives'}")


if __name__ == "__main__":
    main()
