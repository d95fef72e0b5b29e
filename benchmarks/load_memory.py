"""Peak host memory of loading a checkpoint at TP=2, relative to each rank's shard.

Writes a ~1 GB bf16 checkpoint (a legacy .nemo tar and a zarr distributed checkpoint of the same weights),
then loads it in two processes exactly as a server would (open_checkpoint -> load_stage at TP=2, reading
each rank's slices of every tensor) and prints each rank's peak RSS increase over its RSS before loading,
divided by the bytes of the parameters it ended up holding. Target: <= 1.3.

    python -m benchmarks.load_memory [--layers 10] [--workdir DIR]    (from the repository root)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch

import fleetgen.model.checkpoint.distckpt  # noqa: F401  imported before the baseline: code is not weights
import fleetgen.model.checkpoint.nemo  # noqa: F401
from fleetgen.model.checkpoint.open import open_checkpoint
from fleetgen.model.config import ModelConfig
from fleetgen.model.load import load_stage
from fleetgen.model.parallel import ParallelState
from fleetgen.model.tokenizer import load_tokenizer
from tests.checkpoint_writers import canonical_tensors, train_sentencepiece, write_distckpt, write_nemo
from tests.distributed import run_ranks

MB = 1 << 20


def gpt_2b_like(layers: int, vocab_size: int) -> ModelConfig:
    """GPT-2B-001's layer shapes (hidden 2048, fast-swiglu 5440): ~100 MB of bf16 per layer."""
    return ModelConfig(family="nemo_gpt", num_layers=layers, hidden_size=2048, ffn_hidden_size=5440,
                       num_attention_heads=16, num_query_groups=16, head_dim=128, vocab_size=vocab_size,
                       max_position_embeddings=4096, position_embedding="rope", rotary_percent=0.5,
                       normalization="layernorm1p", activation="swiglu", qkv_bias=False, proj_bias=False,
                       mlp_bias=False, tie_word_embeddings=False)


def _peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM). Not ru_maxrss: that keeps the spawning parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def _load_rank(rank: int, world_size: int, path: str, cache: str) -> dict:
    ps = ParallelState.build(world_size, 1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    stage = load_stage(open_checkpoint(path, cache_dir=Path(cache)), ps, "bf16")
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    shard = sum(p.numel() * p.element_size() for p in stage.parameters())
    return {"rank": rank, "shard": shard, "peak_delta": peak - before, "seconds": seconds}


def write_checkpoints(workdir: Path, layers: int) -> dict[str, Path]:
    tokenizer = train_sentencepiece(workdir / "tokenizer")
    config = gpt_2b_like(layers, load_tokenizer(tokenizer).vocab_size)
    tensors = canonical_tensors(config, dtype=torch.bfloat16)
    paths = {".nemo tar (legacy, TP=1 file)": write_nemo(workdir / "gpt.nemo", config, tensors, tokenizer,
                                                         archive="tar"),
             "dist-ckpt zarr (TP=1 chunks)": write_distckpt(workdir / "dist", config, tensors, tokenizer)}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"checkpoint: {config.num_layers} layers, {total / MB:.0f} MB of bf16 weights")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10, help="~100 MB of weights per layer")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fleetgen-loadmem-"))
    try:
        paths = write_checkpoints(workdir, args.layers)
        print(f"{'format':32} {'rank':>4} {'shard MB':>9} {'peak +MB':>9} {'ratio':>6} {'load s':>7}")
        for name, path in paths.items():
            for r in run_ranks(_load_rank, 2, str(path), str(workdir / "cache")):
                print(f"{name:32} {r['rank']:>4} {r['shard'] / MB:>9.0f} {r['peak_delta'] / MB:>9.0f} "
                      f"{r['peak_delta'] / r['shard']:>6.2f} {r['seconds']:>7.1f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
