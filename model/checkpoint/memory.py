"""A checkpoint source over tensors already in memory, keyed by canonical name (see source.py)."""
from __future__ import annotations

from typing import Optional

import torch

from fleetgen.model.checkpoint.source import CheckpointError, Tokenizer
from fleetgen.model.config import ModelConfig


class StateDictSource:
    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor],
                 tokenizer: Optional[Tokenizer] = None):
        self.config = config
        self._tensors = tensors
        self._tokenizer = tokenizer

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise CheckpointError("state dict source: no tokenizer was given")
        return self._tokenizer

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        tensor = self._get(name)
        rows = rows if rows is not None else slice(None)
        return tensor[rows] if tensor.dim() == 1 else tensor[rows, cols if cols is not None else slice(None)]

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise CheckpointError(f"state dict source: no tensor {name!r}")
        return self._tensors[name]
