"""Open any supported checkpoint as a CheckpointSource, and check a recipe's claims against it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from fleetgen.model.checkpoint.source import CheckpointError, CheckpointSource, Tokenizer
from fleetgen.model.config import ModelConfig
from fleetgen.model.tokenizer import given_tokenizer

FORMATS = ("auto", "hf", "nemo", "distckpt", "megatron")
_LOOKED_FOR = ("config.json (hf); a .nemo file, or model_config.yaml with model_weights.ckpt, mp_rank_*/ or "
               "tp_rank_*_pp_rank_*/ (nemo); model_config.yaml with model_weights/metadata.json (distckpt); "
               "latest_checkpointed_iteration.txt (megatron)")


def detect_format(path: Union[str, Path]) -> str:
    """Which reader a checkpoint path needs, from the files it holds."""
    path = Path(path)
    if path.is_file():
        from fleetgen.model.checkpoint.nemo import NemoArchive

        if path.suffix != ".nemo":
            raise CheckpointError(f"{path}: a file checkpoint must be a .nemo archive; looked for {_LOOKED_FOR}")
        return "distckpt" if NemoArchive(path).exists("model_weights/metadata.json") else "nemo"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "latest_checkpointed_iteration.txt").is_file():
        return "megatron"
    if (path / "model_config.yaml").is_file():
        if (path / "model_weights" / "metadata.json").is_file():
            return "distckpt"
        if (path / "model_weights.ckpt").is_file() or any(path.glob("mp_rank_*")) or any(path.glob("tp_rank_*")):
            return "nemo"
    raise CheckpointError(f"{path}: not a checkpoint fleetgen reads; looked for {_LOOKED_FOR}")


def open_checkpoint(path: Union[str, Path], format: str = "auto", tokenizer=None,
                    cache_dir: Optional[Path] = None) -> CheckpointSource:
    """The checkpoint at path as global canonical tensors, read lazily.

    tokenizer: a path (file or directory) or a Tokenizer that replaces the checkpoint's own, or supplies
    one where the checkpoint has none beside it (Megatron-LM). cache_dir: where .nemo tar members are
    extracted on first use (default ~/.cache/fleetgen).
    """
    if format not in FORMATS:
        raise CheckpointError(f"{path}: format={format!r} is not one of {FORMATS}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "hf":
        from fleetgen.model.checkpoint.hf import HFSource

        source = HFSource(path)
        return source if tokenizer is None else _WithTokenizer(source, tokenizer)
    if fmt == "nemo":
        from fleetgen.model.checkpoint.nemo import open_nemo

        return open_nemo(path, tokenizer, cache_dir)
    if fmt == "distckpt":
        from fleetgen.model.checkpoint.distckpt import open_distckpt

        return open_distckpt(path, tokenizer, cache_dir)
    from fleetgen.model.checkpoint.megatron import open_megatron

    return open_megatron(path, tokenizer)


def read_config(path: Union[str, Path], format: str = "auto", tokenizer=None,
                cache_dir: Optional[Path] = None) -> ModelConfig:
    """The checkpoint's architecture, without torch and without reading a tensor: the login node's check
    before submission, through the functions the ranks' open_checkpoint uses. From config.json (hf), or from
    model_config.yaml and the tokenizer it names (distckpt); Megatron-LM and legacy NeMo shard files are
    unpickled without their tensors (torchpickle.PickledIndex), so their keys and shapes are checked too."""
    if format not in FORMATS:
        raise CheckpointError(f"{path}: format={format!r} is not one of {FORMATS}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "hf":
        from fleetgen.model.checkpoint.hf import HFSource

        if tokenizer is not None:
            given_tokenizer(tokenizer)  # a tokenizer given that cannot be read is refused here, as by the ranks
        return HFSource(path).config  # its weight files' keys too, from their headers
    from fleetgen.model.checkpoint.torchpickle import PickledIndex

    if fmt == "nemo":
        from fleetgen.model.checkpoint.nemo import open_nemo

        return open_nemo(path, tokenizer, cache_dir, index=PickledIndex).config
    if fmt == "distckpt":
        from fleetgen.model.checkpoint.nemo import open_nemo_config

        return open_nemo_config(path, tokenizer, cache_dir)[3]
    from fleetgen.model.checkpoint.megatron import open_megatron

    return open_megatron(path, tokenizer, index=PickledIndex).config


def read_tokenizer(path: Union[str, Path], format: str = "auto", tokenizer=None,
                   cache_dir: Optional[Path] = None) -> Tokenizer:
    """The checkpoint's tokenizer, as its source's tokenizer() gives it, without torch: what the login node
    counts prompt tokens with."""
    if tokenizer is not None:
        return given_tokenizer(tokenizer)
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "hf":
        from fleetgen.model.tokenizer import load_tokenizer

        config = read_config(path, fmt)
        return load_tokenizer(path, bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id)
    if fmt in ("nemo", "distckpt"):
        from fleetgen.model.checkpoint.nemo import open_nemo_config

        return open_nemo_config(path, None, cache_dir)[2]
    from fleetgen.model.checkpoint.megatron import find_tokenizer

    return find_tokenizer(Path(path), None)


class _WithTokenizer:
    """A source whose tokenizer is replaced; everything else is the wrapped source's."""

    def __init__(self, source: CheckpointSource, tokenizer):
        self._source = source
        self._tokenizer = given_tokenizer(tokenizer)
        self.config = source.config

    def tokenizer(self):
        return self._tokenizer

    def names(self):
        return self._source.names()

    def shape(self, name):
        return self._source.shape(name)

    def read(self, name, rows=None, cols=None):
        return self._source.read(name, rows, cols)


def validate_against(config: ModelConfig, expected: dict) -> None:
    """Raise if a recipe's value contradicts the checkpoint's architecture.

    Keys are ModelConfig field names, or dotted recipe paths ending in one
    ("model.architecture.num_layers"); None values mean "take the checkpoint's".
    """
    fields = ModelConfig.field_names()
    for key, value in expected.items():
        field = key.rsplit(".", 1)[-1]
        if field not in fields:
            raise CheckpointError(f"{key}: {field!r} is not a model field; valid: {', '.join(fields)}")
        actual = getattr(config, field)
        if value is not None and value != actual:
            raise CheckpointError(f"{key}={value} but the checkpoint says {actual}")
