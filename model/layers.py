"""Building blocks of the decoder: layer norms, rotary embeddings, activations and the tensor-parallel layers.

Parameters are allocated with torch.empty at their *local* (per-TP-rank) shapes on the target device, so a
rank never holds more than its shard; model/shard.py fills them.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fleetgen.model.parallel import (ParallelState, copy_to_tensor_model_parallel_region,
                                     gather_from_tensor_model_parallel_region,
                                     reduce_from_tensor_model_parallel_region)
from fleetgen.model.split import divide

try:
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    # apex's kernel is CUDA only: on a CPU-only host torch's layer norm runs instead
    LAYER_NORM_IMPL = "apex" if torch.cuda.is_available() else "torch"
except ImportError:
    LAYER_NORM_IMPL = "torch"

ONEDNN = torch.backends.mkldnn.is_available()
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
PACKED_FOR_ROWS = 16  # the row count oneDNN lays packed weights out for; that layout served 1 to 256 rows well


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T (+ bias). On CPU through oneDNN: torch's default fp32 GEMM (MKL) runs
    2-4x slower on AMD CPUs, and decode is nothing but these GEMMs (benchmarks/throughput.py)."""
    if x.device.type != "cpu" or x.dtype not in ONEDNN_DTYPES or not ONEDNN:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    # compiled: an opaque op (inductor's own lowering of the oneDNN linear wants frozen weights)
    out = onednn_linear(flat, weight, bias) if torch.compiler.is_compiling() else _onednn(flat, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def pack_linear_weights(module: nn.Module) -> None:
    """Store the weight of every tensor-parallel linear layer of module in oneDNN's own blocked layout, once,
    after loading: oneDNN otherwise reorders the weight on every call, and packed GEMMs ran 1.4-1.7x faster
    here at 8 to 16 rows (a decode step). CPU and oneDNN's dtypes only; the values are unchanged. A tied output
    layer gets a packed copy, the embedding keeping its plain weight for lookups."""
    if not ONEDNN:
        return
    trim = _malloc_trim()
    for layer in module.modules():
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            continue
        weight = layer.weight
        if weight.device.type == "cpu" and weight.dtype in ONEDNN_DTYPES and not weight.is_mkldnn:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS)
            layer.weight = nn.Parameter(packed, requires_grad=False)
            del weight  # the plain weight's last reference: its pages are free now
            trim()


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), or nothing elsewhere. glibc keeps the pages of freed tensors for reuse; the packed
    copies rarely fit them, so without giving them back a rank would hold every weight twice by the end of
    packing."""
    try:
        return functools.partial(ctypes.CDLL(None).malloc_trim, 0)
    except (OSError, AttributeError):  # not glibc
        return lambda: None


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("fleetgen::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _onednn(x, weight, bias)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _empty(*shape: int, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


class LayerNorm(nn.Module):
    """LayerNorm with bias; zero_centered (NeMo's LayerNorm1P) scales by weight + 1."""

    def __init__(self, hidden_size: int, eps: float, zero_centered: bool, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        self.weight = _empty(hidden_size, device=device, dtype=dtype)
        self.bias = _empty(hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered else self.weight
        if LAYER_NORM_IMPL == "apex":
            return fused_layer_norm_affine(x, weight, self.bias, weight.shape, self.eps)
        return F.layer_norm(x, weight.shape, weight, self.bias, self.eps)


ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "squared_relu": lambda x: F.relu(x).square(),
}


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # fc1 rows are [gate; up] on every rank
    return F.silu(gate) * up


def rotary_tables(positions: torch.Tensor, rotary_dim: int, base: float,
                  interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin in fp32 for each position: [n, s, rotary_dim]."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, device=positions.device).float() / rotary_dim)
    freqs = positions[..., None].float() * inv_freq  # [n, s, rotary_dim / 2]
    # GPT-J pairs dims (2i, 2i+1); NeMo / HF-neox pair dim i with i + rotary_dim / 2
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head of x [n, s, heads, head_dim] (in fp32); the rest pass."""
    rotary_dim = cos.shape[-1]
    rot = x[..., :rotary_dim].float()
    cos, sin = cos[:, :, None], sin[:, :, None]  # [n, s, 1, rotary_dim]: same for every head
    rotated = _rotate_every_two(rot) if interleaved else _rotate_half(rot)
    return torch.cat(((rot * cos + rotated * sin).to(x.dtype), x[..., rotary_dim:]), dim=-1)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A's rows (output features) split over TP ranks: weight [output_size / TP, input_size]."""

    def __init__(self, input_size: int, output_size: int, *, ps: ParallelState, bias: bool,
                 gather_output: bool, dtype: torch.dtype):
        super().__init__()
        self.ps, self.gather_output = ps, gather_output
        local = divide(output_size, ps.tp_size, "output_size")
        self.weight = _empty(local, input_size, device=ps.device, dtype=dtype)
        self.bias = _empty(local, device=ps.device, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_model_parallel_region(x, self.ps)
        y = linear(x, self.weight, self.bias)  # [..., output_size / TP]
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, self.ps)  # [..., output_size]
        return y


class RowParallelLinear(nn.Module):
    """Y = X A^T with A's columns (input features) split over TP ranks: weight [output_size, input_size / TP];
    the partial products are all-reduced, then the bias is added once."""

    def __init__(self, input_size: int, output_size: int, *, ps: ParallelState, bias: bool,
                 input_is_parallel: bool, dtype: torch.dtype):
        super().__init__()
        self.ps, self.input_is_parallel = ps, input_is_parallel
        self.weight = _empty(output_size, divide(input_size, ps.tp_size, "input_size"), device=ps.device,
                             dtype=dtype)
        self.bias = _empty(output_size, device=ps.device, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = x.chunk(self.ps.tp_size, dim=-1)[self.ps.tp_rank]  # [..., input_size / TP]
        y = linear(x, self.weight)  # [..., output_size], partial sum
        y = reduce_from_tensor_model_parallel_region(y, self.ps)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [r * V / TP, (r + 1) * V / TP) on TP rank r; ids outside give zeros, then the ranks all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.ps = ps
        local = divide(num_embeddings, ps.tp_size, "padded vocab size")
        self.vocab_start, self.vocab_end = ps.tp_rank * local, (ps.tp_rank + 1) * local
        self.weight = _empty(local, embedding_dim, device=ps.device, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)  # [n, s]
        local_ids = torch.where(outside, 0, ids - self.vocab_start)
        out = F.embedding(local_ids, self.weight)  # [n, s, H]
        out = out.masked_fill(outside[..., None], 0)
        return reduce_from_tensor_model_parallel_region(out, self.ps)
