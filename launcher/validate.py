"""Checks that need more than one field, or the checkpoint itself: all run before anything is submitted."""
from __future__ import annotations

from pathlib import Path

from fleetgen.launcher.errors import LaunchError
from fleetgen.conf.schema import LaunchConfig
from fleetgen.model.config import ModelConfig


def check_model(cfg: LaunchConfig, model: ModelConfig) -> None:
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if model.num_attention_heads % tp:
        raise LaunchError(f"parallel.tensor={tp} does not divide the model's num_attention_heads="
                          f"{model.num_attention_heads}")
    groups = model.num_query_groups
    if groups % tp and tp % groups:
        raise LaunchError(f"parallel.tensor={tp} and the model's num_query_groups={groups}: one must divide "
                          "the other (query groups are split across, or replicated over, tensor ranks)")
    if model.ffn_hidden_size % tp:
        raise LaunchError(f"parallel.tensor={tp} does not divide the model's ffn_hidden_size="
                          f"{model.ffn_hidden_size}")
    if model.num_layers < pp:
        raise LaunchError(f"parallel.pipeline={pp} exceeds the model's num_layers={model.num_layers}")
    if cfg.model.max_seq_len > model.max_position_embeddings and model.position_embedding == "learned":
        raise LaunchError(f"model.max_seq_len={cfg.model.max_seq_len} exceeds the model's "
                          f"max_position_embeddings={model.max_position_embeddings}")


def open_model(cfg: LaunchConfig):
    """The checkpoint's source, opened on the login node: a missing or unreadable checkpoint fails here."""
    from fleetgen.model.checkpoint.open import open_checkpoint, validate_against
    from fleetgen.model.checkpoint.source import CheckpointError

    path = Path(cfg.model.checkpoint)
    if not path.exists():
        raise LaunchError(f"model.checkpoint={cfg.model.checkpoint}: no such file or directory")
    try:
        source = open_checkpoint(path, format=cfg.model.format, tokenizer=cfg.model.tokenizer)
        expected = {f"model.architecture.{key}": value for key, value in cfg.model.architecture.items()}
        validate_against(source.config, expected)
    except (CheckpointError, ValueError) as e:
        raise LaunchError(f"model.checkpoint={cfg.model.checkpoint}: {e}") from None
    return source
