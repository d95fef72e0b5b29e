"""How a model splits over tensor × pipeline ranks, how long a sequence it takes and how many KV-cache blocks
a rank's memory holds: rules that need only its ModelConfig, so that the launcher checks them on the login node
(launcher/validate.py) without importing torch, and the ranks building the model (model/transformer.py,
model/layers.py, model/load.py) apply the same ones."""
from __future__ import annotations

import math
from typing import Optional

from fleetgen.model.config import ModelConfig

BLOCK_SIZE = 16  # positions a KV-cache block (model/kv_cache.py): vLLM's default
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class SplitError(ValueError):
    """A model that cannot be split over `axis` ("tensor" or "pipeline") ranks as asked; the message names the
    model's field."""

    def __init__(self, axis: str, message: str):
        super().__init__(message)
        self.axis = axis


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise SplitError("tensor", f"{what}={total} is not divisible by tensor parallel size {parts}")
    return total // parts


def stage_layers(config: ModelConfig, pp_size: int, pp_rank: int) -> range:
    """Global layer indices held by a stage. The last stage also runs the output layer, as costly as
    output_layer_share(config) layers (half of GPT-2 small's twelve, a little over one of Nemotron-4-340B's
    96), so it takes that many fewer layers, keeping at least one, and the stages of a micro-batched prefill
    are busy alike. The other stages share the rest evenly, the first ones taking one more (3 layers over 2
    stages -> 0-1 | 2)."""
    num_layers = config.num_layers
    if num_layers < pp_size:
        raise SplitError("pipeline", f"num_layers={num_layers} cannot fill {pp_size} pipeline stages")
    if pp_size == 1:
        return range(num_layers)
    head = output_layer_share(config)
    last = math.ceil((num_layers + head) / pp_size - head - 0.5)  # nearest; a tie gives the earlier stages more
    last = min(max(last, 1), num_layers - (pp_size - 1))
    if pp_rank == pp_size - 1:
        return range(num_layers - last, num_layers)
    share, extra = divmod(num_layers - last, pp_size - 1)
    start = pp_rank * share + min(pp_rank, extra)
    return range(start, start + share + (pp_rank < extra))


def output_layer_share(config: ModelConfig) -> float:
    """The output layer's weights over one transformer layer's: what a decode step reads and multiplies."""
    attention = config.hidden_size * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_query_groups)
    mlp = config.hidden_size * config.ffn_hidden_size * (3 if config.activation == "swiglu" else 2)
    return config.vocab_size * config.hidden_size / (attention + mlp)


def local_kv_heads(config: ModelConfig, tp_size: int) -> int:
    """Query groups per TP rank; when TP > groups each group is replicated on TP / groups ranks."""
    groups = config.num_query_groups
    divide(config.num_attention_heads, tp_size, "num_attention_heads")
    if groups % tp_size and tp_size % groups:
        raise SplitError("tensor", f"num_query_groups={groups} and tensor parallel size {tp_size} must divide one "
                                   "another")
    return max(groups // tp_size, 1)


def check_split(config: ModelConfig, tp_size: int, pp_size: int) -> None:
    """Every rule for splitting the model over tensor × pipeline ranks, without building anything (a launcher
    checks them before submission); a SplitError names the model's field."""
    local_kv_heads(config, tp_size)
    stage_layers(config, pp_size, 0)
    divide(config.ffn_hidden_size, tp_size, "ffn_hidden_size")


def check_max_seq_len(config: ModelConfig, max_seq_len: int) -> None:
    """Learned position embeddings end at max_position_embeddings; rotary ones do not refuse a longer cache."""
    if config.position_embedding == "learned" and max_seq_len > config.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {config.max_position_embeddings} "
                         f"learned positions")


def kv_cache_blocks(config: ModelConfig, tp_size: int, pp_size: int, pp_rank: int, precision: str,
                    kv_cache_gb: Optional[float], max_seq_len: int) -> Optional[int]:
    """The KV-cache blocks kv_cache_gb GiB hold on a rank of pipeline stage pp_rank (keys and values of
    BLOCK_SIZE positions in each of its layers); None stays None (a static cache's memory, model/kv_cache.py).
    An error when not even one sequence of max_seq_len fits."""
    if kv_cache_gb is None:
        return None
    layers = len(stage_layers(config, pp_size, pp_rank))
    per_block = 2 * layers * BLOCK_SIZE * local_kv_heads(config, tp_size) * config.head_dim * ELEMENT_BYTES[precision]
    blocks = int(kv_cache_gb * 2**30 // per_block)
    if blocks * BLOCK_SIZE < max_seq_len:
        raise ValueError(f"model.kv_cache_gb={kv_cache_gb} holds {blocks} blocks of {BLOCK_SIZE} positions "
                         f"({per_block} bytes each) on stage {pp_rank}, not one sequence of max_seq_len={max_seq_len}")
    return blocks
