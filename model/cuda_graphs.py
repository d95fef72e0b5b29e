"""CUDA graphs of the decode step: one per (rows, context) bucket of a lane, captured before serving.

A decode step of a 24-layer model is some 700 small kernels; launched one by one from Python, the GPU waits on
the host (3.8% of the memory roofline on an H200, shared/notes/gpu.md). Replaying a captured graph launches
them all at once. A graph reads its inputs from static buffers that the runner fills each step with one
host-to-device copy (StepInputs), and leaves its output in a buffer of its own pool.

Plain torch.cuda.CUDAGraph, not torch.compile's "reduce-overhead": its CUDA-graph trees keep their state per
thread, and a graph recorded on the engine's thread after a warm-up on the main thread failed with a bare
AssertionError (pytorch issue #123177). Every graph here is captured during warm-up by the thread that
replays it, and nothing is captured or compiled while serving.

Tensor-parallel all-reduces inside a graph are NCCL collectives, which CUDA graphs may hold once the
communicator exists (the eager warm-up step makes it): every rank of a stage captures the same graphs in the
same order. Pipeline sends and receives stay outside, between a graph's output and the next one's input.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch

INPUT_ROWS = ("ids", "positions", "writes", "rows_of")  # int64 [4, rows]: what a decode graph reads each step
MIN_CONTEXT = 64  # the smallest context bucket of a decode step


def row_buckets(lane_size: int) -> list[int]:
    """Powers of two up to the lane's size, and the size itself: a step of n rows runs the smallest >= n."""
    sizes, n = [], 1
    while n < lane_size:
        sizes.append(n)
        n *= 2
    return sizes + [lane_size]


def context_buckets(max_seq_len: int, smallest: int = MIN_CONTEXT) -> list[int]:
    """Context lengths a decode step attends over: powers of two and the halfway points between them (64, 96,
    128, 192, ...), so a step reads at most 1.5 times the keys it needs, then max_seq_len itself."""
    sizes, n = [], smallest
    while n < max_seq_len:
        sizes += [n, n + n // 2] if n + n // 2 < max_seq_len else [n]
        n *= 2
    return sizes + [max_seq_len]


def smallest_fit(buckets: Sequence[int], n: int) -> int:
    return next(size for size in buckets if size >= n)


class StepInputs:
    """A lane's decode inputs: int64 [4, rows] on the device (INPUT_ROWS), one host-to-device copy a step.

    Rows without a sequence of the step read token 0 at position 0 and store at the cache's scratch position.
    The copy is asynchronous from pageable memory, which CUDA stages at once: the host goes on to the replay
    without waiting for the GPU."""

    def __init__(self, rows: int, scratch: int, device: torch.device):
        self.scratch = scratch
        self.device_buffer = torch.zeros(len(INPUT_ROWS), rows, dtype=torch.long, device=device)
        self.device_buffer[2].fill_(scratch)

    def fill(self, rows_of: torch.Tensor, lengths: torch.Tensor) -> None:
        """rows_of [n]: each sequence's row in its lane; lengths [n]: the position of its token (set_ids)."""
        host = torch.zeros_like(self.device_buffer, device="cpu")
        host[2] = self.scratch
        host[1, rows_of] = lengths
        host[2, rows_of] = lengths
        host[3, :rows_of.numel()] = rows_of
        self.device_buffer.copy_(host, non_blocking=True)

    def set_ids(self, tokens: torch.Tensor) -> None:
        """The sequences' tokens [n], on the device (copied from the plan, or the last step's outputs): into their
        rows, after fill. Other rows keep earlier ids, which are valid ids: such a row's output is never read."""
        self.device_buffer[0].index_copy_(0, self.device_buffer[3, :tokens.numel()], tokens)

    def view(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, positions, writes of the first rows rows, [rows, 1] each: views of the device buffer."""
        ids, positions, writes, _ = self.device_buffer[:, :rows, None]
        return ids, positions, writes

    def rows_of(self, n: int) -> torch.Tensor:
        return self.device_buffer[3, :n]


class DecodeGraphs:
    """The captured decode steps of one lane. step(rows, context) computes the lane's hidden states
    [rows, 1, H] from the StepInputs (and, past the first stage, from h_in); capture() records one graph per
    bucket, replay() runs one and returns its output buffer, valid until this lane's next replay."""

    def __init__(self, step: Callable[[int, int], torch.Tensor], inputs: StepInputs, h_in: torch.Tensor | None,
                 rows: Sequence[int], contexts: Sequence[int]):
        self.step, self.inputs, self.h_in = step, inputs, h_in
        self.rows, self.contexts = list(rows), list(contexts)
        self._graphs: dict[tuple[int, int], Optional[tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = {}
        self._pool = None  # one memory pool for the lane's graphs: only one of them runs at a time

    def capture(self) -> int:
        """Collective within a stage (its TP ranks capture the same graphs in the same order). Largest first,
        so the pool is sized by the largest graph and the others fit in it. Returns the number captured.
        Off a GPU nothing is captured and replay() runs the bucket's step as it is: the same path, testable."""
        cuda = self.inputs.device_buffer.is_cuda
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        for rows in reversed(self.rows):
            for context in reversed(self.contexts):
                if not cuda:
                    self._graphs[rows, context] = None
                    continue
                with torch.cuda.stream(side):
                    for _ in range(2):  # compile, autotune and allocate outside the graph
                        self.step(rows, context)
                graph = torch.cuda.CUDAGraph()
                # thread_local: the HTTP and liveness threads of this process may use the CUDA API meanwhile
                with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                    out = self.step(rows, context)
                self._pool = graph.pool()
                self._graphs[rows, context] = (graph, out)
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        return len(self._graphs)

    def replay(self, rows: int, context: int) -> torch.Tensor:
        """The step at bucket sizes (rows, context), from the inputs already in place."""
        captured = self._graphs[rows, context]
        if captured is None:
            return self.step(rows, context)
        graph, out = captured
        graph.replay()
        return out

    def bucket(self, rows: int, context: int) -> tuple[int, int]:
        return smallest_fit(self.rows, rows), smallest_fit(self.contexts, context)

    def __len__(self) -> int:
        return len(self._graphs)
