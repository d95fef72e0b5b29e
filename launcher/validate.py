"""Checks that need more than one field, or the checkpoint itself: all run before anything is submitted.

They run on the login node without torch (tests/test_login_node.py): the checkpoint's architecture comes from
its metadata (model/checkpoint/open.py, read_config) and the split rules from model/split.py."""
from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from pathlib import Path

from fleetgen.launcher.errors import LaunchError
from fleetgen.launcher.gpus import MachineGpus, machine_gpus
from fleetgen.conf.schema import LaunchConfig
from fleetgen.model.checkpoint.open import read_config, validate_against
from fleetgen.model.checkpoint.source import CheckpointError
from fleetgen.model.config import ModelConfig
from fleetgen.model.split import SplitError, check_max_seq_len, check_split, kv_cache_blocks


def validate(cfg: LaunchConfig, overrides: list[str]) -> None:
    """Every check before submission, settling what they settle (the GPUs ranks drive, model.max_seq_len)."""
    place_local_ranks(cfg)
    check_local_ports(cfg)
    check_chat_template(cfg)
    fit_to_model(cfg, read_model(cfg), overrides)


def place_local_ranks(cfg: LaunchConfig, machine: Callable[[], MachineGpus] = machine_gpus) -> None:
    """cluster=local: settle cluster.gpus_per_node (null: one GPU a rank if this machine has GPUs, else 0, CPU)
    and cluster.visible_gpus, the GPUs ranks 0, 1, ... drive. More GPU ranks than GPUs is refused: moving them to
    CPU instead would run a GPU-sized job there without a word."""
    cluster, par = cfg.cluster, cfg.parallel
    if cluster.kind != "local" or cluster.gpus_per_node == 0:
        return
    if cluster.visible_gpus is None:
        gpus = machine()
    else:
        gpus = MachineGpus(tuple(cluster.visible_gpus), f"cluster.visible_gpus={cluster.visible_gpus}")
    if cluster.gpus_per_node is None and not gpus.names:
        cluster.gpus_per_node, cluster.visible_gpus = 0, None
        return
    if par.world_size > len(gpus.names):
        fewer = "use fewer ranks, or " if gpus.names else ""
        raise LaunchError(f"parallel.tensor × parallel.pipeline × parallel.replicas = {par.tensor} × {par.pipeline} "
                          f"× {par.replicas} = {par.world_size} ranks, one GPU each, but this machine has {gpus}: "
                          f"{fewer}cluster.gpus_per_node=0 to run them on CPU")
    cluster.gpus_per_node, cluster.visible_gpus = par.world_size, list(gpus.names[:par.world_size])


def check_local_ports(cfg: LaunchConfig) -> None:
    """cluster=local with a fixed server.port: replica r serves on server.port + r, on this machine, so a port
    another process holds is found here instead of as a rank that fails to start."""
    if cfg.cluster.kind != "local" or not cfg.server.port:
        return
    for replica in range(cfg.parallel.replicas):
        port = cfg.server.port + replica
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no owner
            try:
                probe.bind((cfg.server.host, port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise LaunchError(f"server.port={cfg.server.port}: cannot listen on {cfg.server.host}:{port} "
                                      f"({e.strerror})") from None
                which = f" (replica {replica} serves on server.port + {replica})" if replica else ""
                raise LaunchError(f"server.port={cfg.server.port}: port {port} on this machine is taken{which}; "
                                  "give another server.port, or server.port=0 for free ports") from None


def check_chat_template(cfg: LaunchConfig) -> None:
    """model.chat_template: a built-in name or a jinja file that compiles (the checkpoint's own is checked
    where it is found)."""
    from fleetgen.model.chat_template import ChatTemplateError, model_chat_template

    try:
        model_chat_template(cfg.model.chat_template, cfg.model.checkpoint, cfg.model.tokenizer)
    except ChatTemplateError as e:
        raise LaunchError(str(e)) from None


def fit_to_model(cfg: LaunchConfig, model: ModelConfig, overrides: list[str]) -> None:
    """Check the split against the checkpoint's model and settle model.max_seq_len (given KEY=VALUE overrides)."""
    check_model(cfg, model)
    on_command_line = any(o.lstrip("+~").partition("=")[0] == "model.max_seq_len" for o in overrides)
    cfg.model.max_seq_len = fit_max_seq_len(cfg, model, on_command_line)
    check_kv_cache(cfg, model)


def check_kv_cache(cfg: LaunchConfig, model: ModelConfig) -> None:
    """model.kv_cache_gb holds a sequence of model.max_seq_len on every pipeline stage."""
    try:
        for stage in range(cfg.parallel.pipeline):
            kv_cache_blocks(model, cfg.parallel.tensor, cfg.parallel.pipeline, stage, cfg.model.precision,
                            cfg.model.kv_cache_gb, cfg.model.max_seq_len)
    except ValueError as e:
        raise LaunchError(str(e)) from None


def check_model(cfg: LaunchConfig, model: ModelConfig) -> None:
    """The model's own split rules (model/split.py), named by the config key that chose the split."""
    try:
        check_split(model, cfg.parallel.tensor, cfg.parallel.pipeline)
    except SplitError as e:
        raise LaunchError(f"parallel.{e.axis}={getattr(cfg.parallel, e.axis)}: the model's {e}") from None


def fit_max_seq_len(cfg: LaunchConfig, model: ModelConfig, from_command_line: bool) -> int:
    """model.max_seq_len as the ranks will use it: the model's context length unless set lower. A recipe's
    value is an upper bound; a value given on the command line is the user's and must fit (model/split.py)."""
    requested, context = cfg.model.max_seq_len, model.max_position_embeddings
    if requested is None:
        return context
    if not from_command_line:
        return min(requested, context)
    try:
        check_max_seq_len(model, requested)
    except ValueError as e:
        raise LaunchError(f"model.max_seq_len={requested} (on the command line): {e}; leave it out to use the "
                          "model's context length") from None
    return requested


def read_model(cfg: LaunchConfig) -> ModelConfig:
    """The checkpoint's architecture, read on the login node from its metadata: a missing or unreadable
    checkpoint, or one a recipe's model.architecture contradicts, fails here."""
    path = Path(cfg.model.checkpoint)
    if not path.exists():
        raise LaunchError(f"model.checkpoint={cfg.model.checkpoint}: no such file or directory")
    try:
        config = read_config(path, format=cfg.model.format, tokenizer=cfg.model.tokenizer)
        expected = {f"model.architecture.{key}": value for key, value in cfg.model.architecture.items()}
        validate_against(config, expected)
    except (CheckpointError, ValueError) as e:
        raise LaunchError(f"model.checkpoint={cfg.model.checkpoint}: {e}") from None
    return config
