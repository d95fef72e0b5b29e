"""What a torch.save'd file holds, read without torch: its plain values (Megatron's `args` Namespace,
`checkpoint_version`) and each tensor's shape and dtype, never a tensor's bytes.

The login node checks Megatron-LM and legacy NeMo checkpoints with this (PickledIndex stands in for
lazy.TorchFile: model/checkpoint/open.py, read_config): importing torch there would cost the launcher most of its
memory. Only the pickle is read (data.pkl of the zip that torch >= 1.6 writes, or the leading pickles of the
older format); the unpickler builds argparse.Namespace and plain types, turns each tensor into its shape and
dtype, and refuses every other class, as torch.load(weights_only=True) would.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import pickle
import zipfile
from pathlib import Path
from typing import NamedTuple

from fleetgen.model.checkpoint.source import CheckpointError

# torch's dtypes, saved in Megatron's args (params_dtype): kept as their names
_DTYPES = {"float16", "bfloat16", "float32", "float64", "half", "float", "double", "int8", "uint8", "int16",
           "int32", "int64", "bool", "float8_e4m3fn", "float8_e5m2"}
# a tensor's storage type, in its record: the dtype it holds
_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                   "DoubleStorage": "float64", "ByteStorage": "uint8", "CharStorage": "int8", "ShortStorage": "int16",
                   "IntStorage": "int32", "LongStorage": "int64", "BoolStorage": "bool"}
_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice}
_REBUILD = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"}


class TensorShape(NamedTuple):
    """A tensor as this reader sees it: its shape and its dtype's name ("torch.float32")."""
    shape: tuple[int, ...]
    dtype: str


class _Skipped:
    """Stands for what is neither needed nor built here (numpy RNG state arrays and their dtypes)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _tensor(storage: str, offset, size, *rest) -> TensorShape:
    return TensorShape(tuple(size), storage)


def _parameter(data, *rest):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 pickles bytes (numpy arrays' data)
            return codecs.encode
        if module == "torch._utils" and name in _REBUILD:
            return _parameter if name.startswith("_rebuild_parameter") else _tensor
        if module == "torch" and (name.endswith("Storage") or name in _DTYPES):
            return f"torch.{_STORAGE_DTYPES.get(name, name)}"  # a storage's dtype, or a dtype: its name
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and name == "device":
            return str
        if module.startswith("numpy") and name in ("_reconstruct", "ndarray", "dtype") or module == "numpy.dtypes":
            return _Skipped
        raise CheckpointError(f"{self.path}: refusing to unpickle {module}.{name}: only tensors, containers and "
                              "argparse.Namespace are read")

    def persistent_load(self, pid):
        """A tensor's storage, ("storage", its dtype's name, key, location, size): never read, only named."""
        return pid[1] if isinstance(pid, tuple) and len(pid) > 1 else None


class PickledIndex:
    """A torch.save'd dict as lazy.TorchFile presents it (.values, .shapes, .dtypes, keys flattened with dots)
    for building and checking views; no tensor is read, and it cannot read one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.values, self.shapes, self.dtypes = {}, {}, {}
        for key, value in flatten(_read(self.path)):
            if isinstance(value, TensorShape):
                self.shapes[key], self.dtypes[key] = value.shape, value.dtype
            else:
                self.values[key] = value

    def release(self) -> None:
        pass  # nothing mapped


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        contents = _load(path)
    except (pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated?): {e}") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path}: holds a {type(contents).__name__}, expected a state dict")
    return contents


def _load(path: Path):
    if zipfile.is_zipfile(path):  # torch >= 1.6: <name>/data.pkl beside <name>/data/<storage key>
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise CheckpointError(f"{path}: a zip without data.pkl is not a torch checkpoint")
            with archive.open(pickles[0]) as data:
                return _Unpickler(data, path).load()
    with open(path, "rb") as f:  # the older format: magic number, protocol, system info, then the object
        for _ in range(3):
            _Unpickler(f, path).load()
        return _Unpickler(f, path).load()


def flatten(tree, prefix: str = ""):
    """(dotted key, leaf) of a nested state dict, as every reader names stored tensors."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, name + ".")
        else:
            yield name, value
