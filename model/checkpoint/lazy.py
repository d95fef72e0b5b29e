"""Lazy global tensors: views that read only the stored bytes a requested slice overlaps.

A format reader describes each canonical tensor as a tree of views over what is on disk: ``Stored`` (one
tensor of a torch.save'd file), ``ArrayLeaf`` (a zarr or DCP array, or one layer of it), ``Rows`` (a strided subset of
rows, for fused layouts) and ``Concat`` (TP shards or fused pieces side by side). Reading a view walks the
tree and touches only the parts whose ranges overlap the request. Rows and columns travel as ``range``
objects so that strides compose by slicing.
"""
from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from fleetgen.model.checkpoint.source import CheckpointError, Tokenizer
from fleetgen.model.checkpoint.torchpickle import flatten
from fleetgen.model.config import ModelConfig

if TYPE_CHECKING:  # torch is imported where tensors are touched: the login node builds views without it
    import torch

# Harmless types found in Megatron/NeMo pickles: the args Namespace and numpy RNG state arrays.
_reconstruct = np._core.multiarray._reconstruct
SAFE_GLOBALS = [argparse.Namespace, np.ndarray, np.dtype, _reconstruct,
                (_reconstruct, "numpy.core.multiarray._reconstruct"),  # numpy 1 pickles name the old module
                *{type(np.dtype(code)) for code in "?bBhHiIlLqQefdg"}]  # dtype classes the arrays rebuild
SAFE_GLOBAL_NAMES = {"argparse.Namespace", "numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                     "numpy.core.multiarray._reconstruct"}


MAPPED_BYTES_BUDGET = 64 << 20  # mapped bytes read from one file before its mapping is dropped


class TorchFile:
    """A torch.save'd file, memory-mapped while being read and unmapped by release().

    Mapped pages count towards the process's RSS until the mapping goes, so sources release a file once
    reads from it have touched MAPPED_BYTES_BUDGET: peak host memory stays near the slices actually held,
    without paying the unpickling of the file's index on every read.
    """

    def __init__(self, path: Path):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        self._mappable = zipfile.is_zipfile(self.path)  # pre-1.6 (non-zip) files cannot be memory-mapped
        self._refuse_unsafe_globals()
        contents = dict(flatten(self._load()))
        self.values = {k: v for k, v in contents.items() if not isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in contents.items() if isinstance(v, torch.Tensor)}
        self.dtypes = {k: v.dtype for k, v in contents.items() if isinstance(v, torch.Tensor)}
        # mapped but untouched; a file that cannot be mapped is read whole, once, and kept
        self._tensors = {k: v for k, v in contents.items() if k in self.shapes}
        self._touched = 0

    def _refuse_unsafe_globals(self) -> None:
        """Name every disallowed global up front (torch.load would stop at the first)."""
        if not self._mappable:
            return
        import torch

        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(self.path)) - SAFE_GLOBAL_NAMES
        except (RuntimeError, OSError, zipfile.BadZipFile, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint (truncated?): {e}") from None
        if unsafe:
            raise CheckpointError(f"{self.path}: refusing to unpickle {', '.join(sorted(unsafe))}: only tensors, "
                                  f"containers and {', '.join(sorted(SAFE_GLOBAL_NAMES))} are loaded")

    def _load(self) -> dict:
        import torch

        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                contents = torch.load(self.path, map_location="cpu", mmap=self._mappable, weights_only=True)
        except pickle.UnpicklingError as e:
            detail = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            raise CheckpointError(f"{self.path}: refusing to unpickle it: {' '.join(detail.split())}") from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint (truncated?): {e}") from None
        if not isinstance(contents, dict):
            raise CheckpointError(f"{self.path}: holds a {type(contents).__name__}, expected a state dict")
        return contents

    def tensor(self, key: str) -> torch.Tensor:
        """The stored tensor, backed by the mapping: copy what you keep (its pages count as touched)."""
        import torch

        if self._tensors is None:
            self._tensors = {k: v for k, v in flatten(self._load()) if isinstance(v, torch.Tensor)}
        t = self._tensors[key]
        self._touched += t.numel() * t.element_size()  # a column slice touches every page of the tensor
        return t

    def release(self) -> None:
        if self._mappable and self._touched > MAPPED_BYTES_BUDGET:
            self._tensors, self._touched = None, 0


# ---- ranges -----------------------------------------------------------------------------------------

def as_range(s: Optional[slice], n: int, what: str) -> range:
    """A request's step-1 slice as a range, refusing slices that reach outside the tensor."""
    if s is None:
        return range(n)
    start, stop = 0 if s.start is None else s.start, n if s.stop is None else s.stop
    if s.step not in (None, 1) or not 0 <= start <= stop <= n:
        raise CheckpointError(f"{what}: slice {start}:{stop}:{s.step} is outside 0:{n} or strided")
    return range(start, stop)


def _overlap(r: range, lo: int, hi: int) -> tuple[range, range]:
    """(positions in r, values - lo) of the elements of r that fall in [lo, hi)."""
    step = r.step
    first = max(0, -(-(lo - r.start) // step))
    last = min(len(r), max(first, -(-(hi - r.start) // step)))
    picked = r[first:last]
    return range(first, last), range(picked.start - lo, picked.stop - lo, step)


def _as_slice(r: range) -> slice:
    return slice(r.start, r.start + len(r) * r.step, r.step) if len(r) else slice(0, 0)


# ---- views ------------------------------------------------------------------------------------------

class Stored:
    """One tensor of a TorchFile."""

    def __init__(self, file: TorchFile, key: str):
        if key not in file.shapes:
            raise CheckpointError(f"{file.path}: missing key {key}")
        self.file, self.key = file, key
        self.shape, self.dtype = file.shapes[key], file.dtypes[key]
        self.origin = f"{file.path}: {key}"

    def read(self, rows: range, cols: Optional[range]) -> torch.Tensor:
        t = self.file.tensor(self.key)
        picked = t[_as_slice(rows)] if cols is None else t[_as_slice(rows), _as_slice(cols)]
        return picked.clone()  # own the bytes: the mapping may be released after this read


class Rows:
    """The rows of `base` picked by a range (contiguous or strided)."""

    def __init__(self, base, picked: range):
        if len(picked) and (picked[0] < 0 or picked[-1] >= base.shape[0]):
            raise CheckpointError(f"{base.origin}: rows {picked} outside {base.shape[0]} rows")
        self.base, self.picked = base, picked
        self.shape = (len(picked),) + tuple(base.shape[1:])
        self.dtype, self.origin = base.dtype, base.origin

    def read(self, rows: range, cols: Optional[range]) -> torch.Tensor:
        return self.base.read(self.picked[_as_slice(rows)], cols)


class Concat:
    """Views side by side along axis 0 (rows) or 1 (columns)."""

    def __init__(self, parts: list, axis: int):
        other = {tuple(p.shape[:axis] + p.shape[axis + 1:]) for p in parts}
        if len(other) != 1:
            listing = "; ".join(f"{p.origin} {tuple(p.shape)}" for p in parts)
            raise CheckpointError(f"shards disagree on their shapes off axis {axis}: {listing}")
        self.parts, self.axis = parts, axis
        sizes = [p.shape[axis] for p in parts]
        self.offsets = np.cumsum([0] + sizes).tolist()
        shape = list(parts[0].shape)
        shape[axis] = self.offsets[-1]
        self.shape, self.dtype = tuple(shape), parts[0].dtype
        self.origin = parts[0].origin if len(parts) == 1 else f"{parts[0].origin} (+{len(parts) - 1} shards)"

    def read(self, rows: range, cols: Optional[range]) -> torch.Tensor:
        import torch

        wanted = rows if self.axis == 0 else cols
        pieces = []
        for part, lo, hi in zip(self.parts, self.offsets, self.offsets[1:]):
            _, local = _overlap(wanted, lo, hi)
            if len(local):
                pieces.append(part.read(local, cols) if self.axis == 0 else part.read(rows, local))
        if not pieces:  # an empty request still answers with the right dtype and trailing shape
            return self.parts[0].read(range(0), cols) if self.axis == 0 else self.parts[0].read(rows, range(0))
        return torch.cat(pieces, dim=self.axis)


def split_rows(view, sizes: list[int]) -> list[Rows]:
    """Consecutive row blocks of the given sizes, which must cover the view."""
    if sum(sizes) != view.shape[0]:
        raise CheckpointError(f"{view.origin}: has {view.shape[0]} rows, expected {sum(sizes)} ({sizes})")
    starts = np.cumsum([0] + sizes).tolist()
    return [Rows(view, range(a, b)) for a, b in zip(starts, starts[1:])]


def qkv_group_major(part, groups: int, heads_per_group: int, head_dim: int) -> tuple[Concat, Concat, Concat]:
    """Split one partition's fused QKV rows laid out [groups, heads_per_group + 2, head_dim] (q, k, v).

    With heads_per_group == 1 and groups == heads this is the [heads, 3, head_dim] legacy layout.
    """
    block = (heads_per_group + 2) * head_dim
    if part.shape[0] != groups * block:
        raise CheckpointError(f"{part.origin}: fused QKV has {part.shape[0]} rows, expected {groups * block} "
                              f"({groups} groups x ({heads_per_group} + 2) heads x {head_dim})")
    q = [Rows(part, range(g * block, g * block + heads_per_group * head_dim)) for g in range(groups)]
    k = [Rows(part, range(g * block + heads_per_group * head_dim, g * block + block - head_dim))
         for g in range(groups)]
    v = [Rows(part, range(g * block + block - head_dim, (g + 1) * block)) for g in range(groups)]
    return Concat(q, 0), Concat(k, 0), Concat(v, 0)


# ---- zarr (v2, uncompressed, as written by Megatron's zarr strategy) ----------------------------------

_ZARR_DTYPES = {"bfloat16": (np.uint16, "bfloat16"), "<f2": (np.float16, "float16"),  # numpy's, torch's
                "<f4": (np.float32, "float32"), "<f8": (np.float64, "float64")}


class ZarrArray:
    """A zarr v2 array directory read chunk by chunk with numpy memmaps; no zarr dependency."""

    def __init__(self, directory: Path):
        import torch

        meta_path = directory / ".zarray"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: unreadable zarr metadata: {e}") from None
        for field in ("shape", "chunks", "dtype"):
            if field not in meta:
                raise CheckpointError(f"{meta_path}: missing field {field!r}")
        if meta.get("compressor") is not None or meta.get("filters") or meta.get("order", "C") != "C":
            raise CheckpointError(f"{meta_path}: only uncompressed, unfiltered, C-order arrays are supported")
        if meta["dtype"] not in _ZARR_DTYPES:
            raise CheckpointError(f"{meta_path}: dtype {meta['dtype']!r} is not one of {sorted(_ZARR_DTYPES)}")
        self.directory, self.origin = directory, str(directory)
        self.shape, self.chunks = tuple(meta["shape"]), tuple(meta["chunks"])
        self.np_dtype, torch_dtype = _ZARR_DTYPES[meta["dtype"]]
        self.dtype = getattr(torch, torch_dtype)
        self.separator = meta.get("dimension_separator", ".")

    def chunk_path(self, index: tuple[int, ...]) -> Path:
        return self.directory / self.separator.join(str(i) for i in index)

    def read(self, region: list[range]) -> torch.Tensor:
        """The step-1 region (one range per axis) as a tensor, reading only the chunks it overlaps."""
        out = np.empty([len(r) for r in region], dtype=self.np_dtype)
        per_axis = [range(r.start // c, -(-r.stop // c)) if len(r) else range(0)
                    for r, c in zip(region, self.chunks)]
        for index in product(*per_axis):
            src, dst = [], []
            for r, c, i in zip(region, self.chunks, index):
                placed, local = _overlap(r, i * c, (i + 1) * c)
                src.append(_as_slice(local))
                dst.append(_as_slice(placed))
            out[tuple(dst)] = self._chunk(index)[tuple(src)]
        import torch

        return torch.from_numpy(out).view(self.dtype)

    def _chunk(self, index: tuple[int, ...]) -> np.memmap:
        path = self.chunk_path(index)
        expected = int(np.prod(self.chunks)) * np.dtype(self.np_dtype).itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            state = "missing" if size is None else f"{size} bytes, expected {expected}"
            raise CheckpointError(f"{path}: zarr chunk {state}")
        return np.memmap(path, dtype=self.np_dtype, mode="r", shape=self.chunks)


class ArrayLeaf:
    """An on-disk array (ZarrArray, a DCP tensor), or one layer of a layer-stacked one (leading axis fixed).

    `array` answers read(region) for step-1 ranges, one per axis; strided rows read their span.
    """

    def __init__(self, array, layer: Optional[int] = None):
        self.array, self.layer = array, layer
        self.shape = tuple(array.shape) if layer is None else tuple(array.shape[1:])
        self.dtype = array.dtype
        self.origin = array.origin + ("" if layer is None else f" [layer {layer}]")

    def read(self, rows: range, cols: Optional[range]) -> torch.Tensor:
        span = range(rows.start, rows.start + (len(rows) - 1) * rows.step + 1) if len(rows) else range(0)
        region = [span] + ([] if cols is None else [cols])
        if self.layer is not None:
            region = [range(self.layer, self.layer + 1)] + region
        t = self.array.read(region)
        t = t[0] if self.layer is not None else t
        return t[::rows.step].clone() if rows.step != 1 else t


# ---- the source -----------------------------------------------------------------------------------------

class LazySource:
    """A CheckpointSource over global views; file mappings are dropped once reads have touched enough."""

    def __init__(self, config: ModelConfig, views: dict, tokenizer: Tokenizer, files: list[TorchFile] = ()):
        self.config = config
        self._views = views
        self._tokenizer = tokenizer
        self._files = list(files)

    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def names(self) -> set[str]:
        return set(self._views)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._view(name).shape)

    def origin(self, name: str) -> str:
        """The file and key a canonical tensor comes from, for messages."""
        return self._view(name).origin

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        view = self._view(name)
        if len(view.shape) == 1 and cols is not None:
            raise CheckpointError(f"{view.origin}: {name} is 1-D; cols must be None")
        row_range = as_range(rows, view.shape[0], f"{name} rows")
        col_range = None if len(view.shape) == 1 else as_range(cols, view.shape[1], f"{name} cols")
        try:
            return view.read(row_range, col_range).contiguous()
        finally:
            for f in self._files:
                f.release()

    def _view(self, name: str):
        if name not in self._views:
            raise CheckpointError(f"no tensor {name!r} in this checkpoint ({len(self._views)} tensors)")
        return self._views[name]


# ---- canonical shapes -------------------------------------------------------------------------------------

def canonical_shapes(config: ModelConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor a checkpoint of this architecture holds, with its global shape."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_query_groups * config.head_dim
    shapes = {"embedding.word_embeddings.weight": (vocab_rows, hidden),
              "final_layernorm.weight": (hidden,), "final_layernorm.bias": (hidden,)}
    if config.position_embedding == "learned":
        shapes["embedding.position_embeddings.weight"] = (config.max_position_embeddings, hidden)
    if not config.tie_word_embeddings:
        shapes["output_layer.weight"] = (vocab_rows, hidden)
    if config.output_bias:
        shapes["output_layer.bias"] = (vocab_rows,)
    for i in range(config.num_layers):
        layer = {"input_layernorm.weight": (hidden,), "input_layernorm.bias": (hidden,),
                 "self_attention.query.weight": (q_rows, hidden), "self_attention.key.weight": (kv_rows, hidden),
                 "self_attention.value.weight": (kv_rows, hidden),
                 "self_attention.linear_proj.weight": (hidden, q_rows),
                 "mlp.linear_fc1.weight": (ffn, hidden), "mlp.linear_fc2.weight": (hidden, ffn)}
        if config.qkv_bias:
            layer.update({"self_attention.query.bias": (q_rows,), "self_attention.key.bias": (kv_rows,),
                          "self_attention.value.bias": (kv_rows,)})
        if config.proj_bias:
            layer["self_attention.linear_proj.bias"] = (hidden,)
        if not config.parallel_residual:
            layer.update({"pre_mlp_layernorm.weight": (hidden,), "pre_mlp_layernorm.bias": (hidden,)})
        if config.activation == "swiglu":
            layer["mlp.gate.weight"] = (ffn, hidden)
        if config.mlp_bias:
            layer.update({"mlp.linear_fc1.bias": (ffn,), "mlp.linear_fc2.bias": (hidden,)})
            if config.activation == "swiglu":
                layer["mlp.gate.bias"] = (ffn,)
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def check_views(views: dict, config: ModelConfig, described_by: str) -> None:
    """Every canonical tensor the config implies is present with its shape, and nothing else is."""
    embedding = views.get("embedding.word_embeddings.weight")
    vocab_rows = embedding.shape[0] if embedding is not None else config.vocab_size
    expected = canonical_shapes(config, vocab_rows)
    for name, shape in expected.items():
        if name not in views:
            raise CheckpointError(f"{described_by} implies {name} {shape}, which the checkpoint lacks")
        if tuple(views[name].shape) != shape:
            raise CheckpointError(f"{views[name].origin}: gives {name} shape {tuple(views[name].shape)}, but "
                                  f"{described_by} implies {shape}")
    for name in sorted(set(views) - set(expected)):
        raise CheckpointError(f"{views[name].origin}: gives {name}, which {described_by} does not imply")
    if vocab_rows < config.vocab_size:
        raise CheckpointError(f"{embedding.origin}: {vocab_rows} embedding rows, fewer than the tokenizer's "
                              f"{config.vocab_size} tokens")
