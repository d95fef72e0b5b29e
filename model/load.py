"""Build this rank's shard of the decoder from a checkpoint source, and the generator around it."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fleetgen.model.shard import load_shard, vocab_rows
from fleetgen.model.checkpoint.source import CheckpointSource
from fleetgen.model.generate import Generator
from fleetgen.model.layers import LAYER_NORM_IMPL, pack_linear_weights
from fleetgen.model.parallel import ParallelState
from fleetgen.model.split import check_max_seq_len, kv_cache_blocks
from fleetgen.model.transformer import DecoderStage

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {sorted(PRECISIONS)}")
    return PRECISIONS[precision]


def load_stage(source: CheckpointSource, ps: ParallelState, precision: str) -> DecoderStage:
    """Allocate only this rank's shard and fill it with only this rank's slices."""
    config, dtype = source.config, dtype_of(precision)
    rows = vocab_rows(config, source)
    stage = DecoderStage(config, ps, config.padded_vocab_size(ps.tp_size, max(rows.values())), dtype)
    load_shard(stage, source, rows)
    pack_linear_weights(stage)
    return stage.eval()


def build_generator(source: CheckpointSource, ps: ParallelState, precision: str, max_batch: int,
                    max_seq_len: int, compile: Union[bool, str] = False, lanes: int = 1,
                    graphs: Optional[bool] = None, kv_cache_gb: Optional[float] = None) -> Generator:
    """compile: torch.compile each layer's parts around attention (Generator); "auto" does on a GPU, where it
    made the decode graph of a GPT-2B-001-shaped model 1.4x faster for 11 s of start-up (README), not on a CPU,
    where the step is its oneDNN GEMMs and compiled and eager steps measured alike.
    lanes: groups of KV-cache slots whose steps may be in flight at once (Generator).
    graphs: decode through captured graphs; None: on a GPU (model/cuda_graphs.py).
    kv_cache_gb: this rank's KV cache, in GiB of blocks; None: max_seq_len positions for each of max_batch slots."""
    check_max_seq_len(source.config, max_seq_len)
    compiled = ps.device.type == "cuda" if compile == "auto" else bool(compile)
    stage = load_stage(source, ps, precision)
    return Generator(stage, ps, max_batch, max_seq_len, compile=compiled, lanes=lanes, graphs=graphs,
                     num_blocks=kv_cache_blocks(source.config, ps.tp_size, ps.pp_size, ps.pp_rank, precision,
                                                kv_cache_gb, max_seq_len))


def startup_report(generator: Generator) -> str:
    """One line: what this rank holds and how much cache it reserved."""
    stage, ps, config = generator.stage, generator.ps, generator.config
    return (f"{config.family}: {config.num_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads / {config.num_query_groups} groups, vocab {config.vocab_size} "
            f"(padded {stage.padded_vocab}); {ps.describe()}; {stage.describe()}; "
            f"{str(stage.dtype).removeprefix('torch.')}; layer norm {LAYER_NORM_IMPL}; "
            f"{generator.cache.describe()}")
