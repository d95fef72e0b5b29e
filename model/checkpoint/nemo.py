""".nemo checkpoints: the archive, model_config.yaml, and legacy (non-mcore) Megatron GPT weights.

A .nemo is a tar (uncompressed; very old ones gzip) written with arcname "." or the same tree extracted to
a directory. Members are extracted one by one, on first use, into a cache directory so that torch.load can
memory-map them. Legacy weights are model_weights.ckpt, or one per shard in mp_rank_XX/ (TP only) or
tp_rank_XX_pp_rank_XXX/ with layer numbers local to each pipeline stage.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tarfile
import zlib
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Optional, Union

import yaml

from fleetgen.model.checkpoint.lazy import (Concat, LazySource, Stored, TorchFile, check_views,
                                            qkv_group_major, split_rows)
from fleetgen.model.checkpoint.megatron import LanguageModelLayout
from fleetgen.model.checkpoint.source import CheckpointError, Tokenizer
from fleetgen.model.config import ModelConfig
from fleetgen.model.tokenizer import given_tokenizer, load_tokenizer

DEFAULT_CACHE = Path.home() / ".cache" / "fleetgen"
CONFIG_FILE = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"


class NemoArchive:
    """A .nemo tar or extracted directory; names are member paths relative to its root."""

    def __init__(self, path: Union[str, Path], cache_dir: Optional[Path] = None):
        self.path = Path(path)
        if self.path.is_dir():
            self._members = None
        elif self.path.is_file():
            self._members = self._index()
            stat = self.path.stat()
            key = hashlib.sha1(f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
            self._cache = Path(cache_dir or DEFAULT_CACHE) / "nemo" / f"{self.path.stem}-{key[:12]}"
        else:
            raise CheckpointError(f"{self.path}: no such file or directory")

    def _index(self) -> dict[str, tarfile.TarInfo]:
        members, last = {}, None
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for m in tar:  # stepping past a member checks that its data is all there
                    last = _member_name(m.name, self.path)
                    if m.isfile():
                        members[last] = m
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            where = f" at or after member {last}" if last else ""
            raise CheckpointError(f"{self.path}: truncated or corrupt .nemo archive{where}: {e}") from None
        return members

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file() if self._members is None else name in self._members

    def glob(self, pattern: str) -> list[str]:
        """Member names matching a pattern whose `*` stays within one path component."""
        if self._members is None:
            return sorted(p.relative_to(self.path).as_posix() for p in self.path.glob(pattern) if p.is_file())
        depth = pattern.count("/")
        return sorted(n for n in self._members if n.count("/") == depth and fnmatch(n, pattern))

    def read_text(self, name: str) -> str:
        return self.local(name).read_text()

    def local(self, name: str) -> Path:
        """A filesystem path holding the member; tar members are extracted once into the cache."""
        if self._members is None:
            path = self.path / name
            if not path.is_file():
                raise CheckpointError(f"{path}: file not found")
            return path
        if name not in self._members:
            raise CheckpointError(f"{self.path}: no member {name}")
        target = self._cache / name
        if not target.is_file():
            self._extract(name, target)
        return target

    def local_dir(self, prefix: str) -> Path:
        """A directory holding every member under prefix/ (extracting them for a tar)."""
        if self._members is None:
            return self.path / prefix
        for name in self._members:
            if name.startswith(prefix + "/"):
                self.local(name)
        return self._cache / prefix

    def _extract(self, name: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(self._cache / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # ranks sharing a node extract each member once
            if target.is_file():
                return
            partial = target.with_name(f"{target.name}.part{os.getpid()}")
            try:
                with tarfile.open(self.path, "r:*") as tar, open(partial, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(self._members[name]), out, 16 << 20)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                partial.unlink(missing_ok=True)
                raise CheckpointError(f"{self.path}: member {name} cannot be extracted (truncated?): {e}") from None
            os.replace(partial, target)


def _member_name(raw: str, archive: Path) -> str:
    parts = [p for p in PurePosixPath(raw).parts if p not in (".", "/")]
    if ".." in parts:
        raise CheckpointError(f"{archive}: member {raw!r} points outside the archive")
    return "/".join(parts)


# ---- model_config.yaml ---------------------------------------------------------------------------------

def read_nemo_config(archive: NemoArchive) -> dict:
    if not archive.exists(CONFIG_FILE):
        raise CheckpointError(f"{archive.path}: no {CONFIG_FILE}")
    try:
        cfg = yaml.safe_load(archive.read_text(CONFIG_FILE))
    except yaml.YAMLError as e:
        raise CheckpointError(f"{archive.path}/{CONFIG_FILE}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{archive.path}/{CONFIG_FILE}: expected a mapping at the top level")
    return cfg


_ACTIVATIONS = {"fast-swiglu": "swiglu", "swiglu": "swiglu", "squared-relu": "squared_relu"}
_POSITIONS = {"learned_absolute": "learned", "rope": "rope"}


def nemo_model_config(cfg: dict, tokenizer: Tokenizer, where: str) -> ModelConfig:
    """ModelConfig from a model_config.yaml (legacy and mcore NeMo share these keys)."""
    def need(key):
        if cfg.get(key) is None:
            raise CheckpointError(f"{where}: missing key {key}")
        return cfg[key]

    heads, hidden = need("num_attention_heads"), need("hidden_size")
    bias = cfg.get("bias", True)
    return ModelConfig(
        family="nemotron" if cfg.get("activation") == "squared-relu" else "nemo_gpt",
        num_layers=need("num_layers"), hidden_size=hidden, ffn_hidden_size=need("ffn_hidden_size"),
        num_attention_heads=heads, num_query_groups=cfg.get("num_query_groups") or heads,
        head_dim=cfg.get("kv_channels") or hidden // heads, vocab_size=tokenizer.vocab_size,
        max_position_embeddings=cfg.get("max_position_embeddings") or need("encoder_seq_length"),
        position_embedding=_choice(cfg, "position_embedding_type", "learned_absolute", _POSITIONS, where),
        rotary_percent=float(cfg.get("rotary_percentage", cfg.get("rotary_percent", 1.0))),
        rotary_base=float(cfg.get("rotary_base", 10000)),
        normalization=_normalization(cfg, where), layernorm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
        activation=_activation(cfg, bias, where), qkv_bias=bias, proj_bias=bias, mlp_bias=bias,
        tie_word_embeddings=cfg.get("share_embeddings_and_output_weights", True),
        make_vocab_size_divisible_by=cfg.get("make_vocab_size_divisible_by", 128),
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def _choice(cfg: dict, key: str, default: str, allowed: dict, where: str) -> str:
    value = cfg.get(key) or default
    if value not in allowed:
        raise CheckpointError(f"{where}: {key}={value!r} is not supported (one of {sorted(allowed)})")
    return allowed[value]


def _normalization(cfg: dict, where: str) -> str:
    value = str(cfg.get("normalization") or "layernorm").lower()
    if value not in ("layernorm", "layernorm1p"):
        raise CheckpointError(f"{where}: normalization={value!r} is not supported (layernorm, layernorm1p)")
    return "layernorm1p" if cfg.get("layernorm_zero_centered_gamma") else value


def _activation(cfg: dict, bias: bool, where: str) -> str:
    value = cfg.get("activation") or "gelu"
    if value == "gelu":
        # NeMo's fused bias-gelu (on by default, needs biases) and openai_gelu are the tanh approximation
        fused = cfg.get("bias_activation_fusion", True) and bias
        return "gelu_tanh" if cfg.get("openai_gelu") or fused else "gelu"
    return _choice(cfg, "activation", "gelu", _ACTIVATIONS, where)


def nemo_tokenizer(archive: NemoArchive, cfg: dict, override=None) -> Tokenizer:
    """The tokenizer model_config.yaml names (``nemo:`` members of the archive), unless overridden."""
    if override is not None:
        return given_tokenizer(override)
    tok = cfg.get("tokenizer") or {}
    where = f"{archive.path}/{CONFIG_FILE}"
    if tok.get("library") == "sentencepiece":
        return load_tokenizer(_tokenizer_file(archive, tok, "model", where))
    if tok.get("library") == "megatron" and tok.get("type") == "GPT2BPETokenizer":
        return load_tokenizer(_tokenizer_file(archive, tok, "vocab_file", where),
                              merges=_tokenizer_file(archive, tok, "merge_file", where))
    raise CheckpointError(f"{where}: tokenizer library={tok.get('library')!r} type={tok.get('type')!r} is not "
                          f"supported (sentencepiece, megatron GPT2BPETokenizer); pass tokenizer=")


def _tokenizer_file(archive: NemoArchive, tok: dict, key: str, where: str) -> Path:
    value = tok.get(key)
    if not value:
        raise CheckpointError(f"{where}: missing key tokenizer.{key}")
    name = value[len("nemo:"):] if value.startswith("nemo:") else PurePosixPath(value).name
    if archive.exists(name):
        return archive.local(name)
    if Path(value).is_file():  # an absolute path from the training cluster that also exists here
        return Path(value)
    raise CheckpointError(f"{where}: tokenizer.{key}={value!r} is neither in {archive.path} nor on disk")


def open_nemo_config(path: Union[str, Path, NemoArchive], tokenizer=None,
                     cache_dir: Optional[Path] = None) -> tuple[NemoArchive, dict, Tokenizer, ModelConfig]:
    """The archive, its model_config.yaml as a dict, the tokenizer it names (unless overridden) and the
    ModelConfig from both: what the legacy and mcore .nemo readers share."""
    archive = path if isinstance(path, NemoArchive) else NemoArchive(path, cache_dir)
    cfg = read_nemo_config(archive)
    tok = nemo_tokenizer(archive, cfg, tokenizer)
    return archive, cfg, tok, nemo_model_config(cfg, tok, f"{archive.path}/{CONFIG_FILE}")


# ---- legacy Megatron GPT weights ------------------------------------------------------------------------

_SHARD_DIRS = (re.compile(r"mp_rank_(\d+)/" + re.escape(WEIGHTS_FILE)),
               re.compile(r"tp_rank_(\d+)_pp_rank_(\d+)/" + re.escape(WEIGHTS_FILE)))
# buffers, TE fp8 state, and the last stage's copy of tied embeddings (the first stage's is read)
_IGNORED = re.compile(r".*(rotary_pos_emb\.inv_freq|_extra_state)$|^model\.(module\.)?word_embeddings\.weight$")
_LAYER = re.compile(r"language_model\.encoder\.layers\.(\d+)\.")


def shard_files(archive: NemoArchive, cfg: dict) -> dict[tuple[int, int], str]:
    """(tp_rank, pp_rank) -> member name, checking that the whole TP x PP grid is there."""
    if archive.exists(WEIGHTS_FILE):
        return {(0, 0): WEIGHTS_FILE}
    found = {}
    for name in archive.glob("mp_rank_*/" + WEIGHTS_FILE) + archive.glob("tp_rank_*_pp_rank_*/" + WEIGHTS_FILE):
        ranks = next(m.groups() for p in _SHARD_DIRS if (m := p.fullmatch(name)))
        found[(int(ranks[0]), int(ranks[1]) if len(ranks) > 1 else 0)] = name
    if not found:
        raise CheckpointError(f"{archive.path}: no {WEIGHTS_FILE}, mp_rank_*/ or tp_rank_*_pp_rank_*/ shards")
    tp = max(max(t for t, _ in found) + 1, cfg.get("tensor_model_parallel_size") or 1)
    pp = max(max(p for _, p in found) + 1, cfg.get("pipeline_model_parallel_size") or 1)
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in found:
                expected = f"mp_rank_{t:02d}" if pp == 1 else f"tp_rank_{t:02d}_pp_rank_{p:03d}"
                raise CheckpointError(f"{archive.path}: missing shard {expected}/{WEIGHTS_FILE} "
                                      f"(TP={tp} x PP={pp})")
    return found


def open_nemo(path: Union[str, Path, NemoArchive], tokenizer=None, cache_dir: Optional[Path] = None,
              index=TorchFile) -> LazySource:
    """A legacy (non-mcore) NeMo GPT checkpoint, .nemo tar or extracted directory, at any TP x PP split. index:
    how each shard file is opened (megatron.open_megatron says why)."""
    archive, cfg, tok, config = open_nemo_config(path, tokenizer, cache_dir)
    where = f"{archive.path}/{CONFIG_FILE}"
    if config.num_query_groups != config.num_attention_heads:
        raise CheckpointError(f"{where}: num_query_groups is not supported by legacy NeMo GPT checkpoints")
    members = shard_files(archive, cfg)
    files = {ranks: index(archive.local(name)) for ranks, name in sorted(members.items())}
    views = LegacyLayout(files, config, cfg.get("activation") or "gelu").views()
    check_views(views, config, where)
    return LazySource(config, views, tok, list(files.values()))


class LegacyLayout(LanguageModelLayout):
    """Maps legacy keys of every shard file to canonical global views."""

    final_norm = "encoder.final_layernorm"

    def __init__(self, files: dict[tuple[int, int], TorchFile], config: ModelConfig, activation: str):
        self.files, self.config, self.activation = files, config, activation
        self.tp = max(t for t, _ in files) + 1
        self.pp = max(p for _, p in files) + 1
        first = files[(0, 0)]
        self.prefix = "model.module." if any(k.startswith("model.module.") for k in first.shapes) else "model."
        for what, n in (("num_attention_heads", config.num_attention_heads),
                        ("ffn_hidden_size", config.ffn_hidden_size)):
            if n % self.tp:
                raise CheckpointError(f"{first.path}: {what}={n} does not divide over the {self.tp} TP shards")
        self.layers = [self._stage_layers(p) for p in range(self.pp)]
        self._check_keys()

    def _stage_layers(self, stage: int) -> int:
        found = {int(m.group(1)) for k in self.files[(0, stage)].shapes if (m := _LAYER.search(k))}
        if found != set(range(len(found))):
            raise CheckpointError(f"{self.files[(0, stage)].path}: layer numbers {sorted(found)} are not 0..n-1")
        return len(found)

    def _check_keys(self) -> None:
        known = re.compile(re.escape(self.prefix) + r"language_model\.(embedding\.(word|position)_embeddings\.weight|"
                           r"output_layer\.weight|encoder\.final_layernorm\.(weight|bias)|encoder\.layers\.\d+\."
                           r"(input_layernorm|post_attention_layernorm)\.(weight|bias)|encoder\.layers\.\d+\."
                           r"(self_attention\.(query_key_value|dense)|mlp\.dense_(h_to_4h|h_to_4h_2|4h_to_h))"
                           r"\.(weight|bias))$")
        for f in self.files.values():
            for key in f.shapes:
                if not known.match(key) and not _IGNORED.match(key):
                    raise CheckpointError(f"{f.path}: unknown key {key}")

    def _key(self, name: str) -> str:
        return self.prefix + "language_model." + name

    def _find(self, t: int, p: int, name: str) -> Stored:
        return Stored(self.files[(t, p)], self._key(name))

    def _layer_counts(self) -> list[int]:
        return self.layers

    def _layer(self, p: int, j: int) -> dict:
        c, tp = self.config, self.tp
        heads_local, ffn_local = c.num_attention_heads // tp, c.ffn_hidden_size // tp
        pre = f"encoder.layers.{j}."
        suffixes = ["weight"] + (["bias"] if c.qkv_bias else [])
        out = {f"{canon}.{s}": self._find(0, p, f"{pre}{stored}.{s}")
               for canon, stored in (("input_layernorm", "input_layernorm"),
                                     ("pre_mlp_layernorm", "post_attention_layernorm"))
               for s in ("weight", "bias")}
        for s in suffixes:
            # per TP rank the fused rows are [heads_local, 3, head_dim]
            parts = [qkv_group_major(self._find(t, p, f"{pre}self_attention.query_key_value.{s}"),
                                     heads_local, 1, c.head_dim) for t in range(tp)]
            for i, which in enumerate(("query", "key", "value")):
                out[f"self_attention.{which}.{s}"] = Concat([part[i] for part in parts], 0)
        out["self_attention.linear_proj.weight"] = Concat(
            [self._find(t, p, f"{pre}self_attention.dense.weight") for t in range(tp)], 1)
        out["mlp.linear_fc2.weight"] = Concat([self._find(t, p, f"{pre}mlp.dense_4h_to_h.weight")
                                               for t in range(tp)], 1)
        if c.proj_bias:
            out["self_attention.linear_proj.bias"] = self._find(0, p, f"{pre}self_attention.dense.bias")
        if c.mlp_bias:
            out["mlp.linear_fc2.bias"] = self._find(0, p, f"{pre}mlp.dense_4h_to_h.bias")
        for s in ["weight"] + (["bias"] if c.mlp_bias else []):
            out.update(self._fc1(p, pre, s, ffn_local))
        return out

    def _fc1(self, p: int, pre: str, s: str, ffn_local: int) -> dict:
        fc1 = [self._find(t, p, f"{pre}mlp.dense_h_to_4h.{s}") for t in range(self.tp)]
        if self.activation == "fast-swiglu":  # per TP rank: [gate_local; up_local]
            halves = [split_rows(part, [ffn_local, ffn_local]) for part in fc1]
            return {f"mlp.gate.{s}": Concat([h[0] for h in halves], 0),
                    f"mlp.linear_fc1.{s}": Concat([h[1] for h in halves], 0)}
        if self.activation == "swiglu":  # separate up projection dense_h_to_4h_2
            up = [self._find(t, p, f"{pre}mlp.dense_h_to_4h_2.{s}") for t in range(self.tp)]
            return {f"mlp.gate.{s}": Concat(fc1, 0), f"mlp.linear_fc1.{s}": Concat(up, 0)}
        return {f"mlp.linear_fc1.{s}": Concat(fc1, 0)}
