"""A tiny real GPT-2 checkpoint, a served engine around it, and transformers references for the server tests.

Rank processes spawned by run_ranks import this module: transformers and tokenizers are imported only where
a checkpoint or a reference is built, which keeps several seconds per rank out of every multi-process test.
"""
from __future__ import annotations

import inspect
import os
import json.decoder
import json.encoder
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from fleetgen.model.checkpoint.open import open_checkpoint
from fleetgen.model.serve.engine import Engine
from fleetgen.model.load import build_generator
from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve.server import Server

EOT = "<|endoftext|>"
MODEL = "tiny"
# a few KB of text with multi-byte characters, so some characters span several byte-level tokens
CORPUS = [inspect.getsource(json.decoder), inspect.getsource(json.encoder),
          "Café, naïve, façade — déjà vu. 東京 and 北京. Grüße! ½ ≤ ¾ → ∞. 😀 🚀\n" * 20]


def build_tiny_checkpoint(path: Path, eos_loving: bool = False, seed: int = 0) -> Path:
    """A random GPT-2 (hidden 64, 2 layers, 4 heads) with a byte-level BPE trained on CORPUS, in HF layout.

    eos_loving: the final norm's bias points at the end-of-text embedding, so greedy decoding picks it
    first unless it is banned (for min_tokens_to_generate).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(CORPUS, vocab_size=512, min_frequency=2, special_tokens=[EOT])
    tokenizer.save_model(str(path))
    eos = tokenizer.token_to_id(EOT)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        initializer_range=0.3, bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    if eos_loving:
        with torch.no_grad():
            direction = torch.nn.functional.normalize(torch.randn(64), dim=0)
            model.transformer.wte.weight[eos] = 10 * direction
            model.transformer.ln_f.bias.copy_(5 * direction)
    model.save_pretrained(path)
    return path


def reference_model(path: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint, built once per test module that imports this fixture."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The transformers model over the same checkpoint."""
    return reference_model(checkpoint)


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """fp32 logits [len(ids), vocab]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def reference_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """Argmax continuation by full forward passes, not stopping at end-of-text."""
    ids = list(ids)
    for _ in range(new_tokens):
        ids.append(int(reference_logits(model, ids)[-1].argmax()))
    return ids[-new_tokens:]


@dataclass
class Served:
    server: Server
    engine: Engine
    url: str


def make_engine(checkpoint: Path, ps: ParallelState, max_batch: int = 4, max_seq_len: int = 128,
                lanes: Optional[int] = None, graphs: Optional[bool] = None, kv_cache_gb: Optional[float] = None,
                prefix_caching: bool = True) -> Engine:
    """lanes: one a pipeline stage by default, as the worker builds it. graphs: decode through the GPU's
    bucketed graph path (run as it is on a CPU)."""
    source = open_checkpoint(checkpoint)
    generator = build_generator(source, ps, "fp32", max_batch, max_seq_len, lanes=lanes or ps.pp_size,
                                graphs=graphs, kv_cache_gb=kv_cache_gb)
    return Engine(generator, source.tokenizer(), ps, source.config, prefix_caching=prefix_caching)


@contextmanager
def serving(checkpoint: Path, max_batch: int = 4, max_seq_len: int = 128, **server_options):
    """A one-rank server with the real engine, shut down (and checked to be gone) on exit."""
    server = Server("127.0.0.1", 0, model_name=MODEL, **server_options)
    ps = ParallelState.single()
    engine = make_engine(checkpoint, ps, max_batch, max_seq_len)
    engine.warm_up()
    server.attach(engine)
    try:
        yield Served(server, engine, f"http://127.0.0.1:{server.port}")
    finally:
        server.shutdown()
        server.wait()


def fleetgen_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fleetgen-")]


def serve_on_ranks(rank: int, world_size: int, checkpoint: str, tensor: int, pipeline: int, port_file: str):
    """A replica over real processes, as model/serve/worker.py runs one: rank 0 serves, the others follow.
    Returns what each rank saw when it ended."""
    ps = ParallelState.build(tensor, pipeline)
    if ps.world_rank != ps.first_rank:
        engine = make_engine(Path(checkpoint), ps)
        engine.warm_up()
        engine.follow()
        return "followed until shutdown"
    server = Server("127.0.0.1", 0, model_name=MODEL)
    engine = make_engine(Path(checkpoint), ps)
    engine.warm_up()
    server.attach(engine)
    Path(port_file + ".tmp").write_text(str(server.port))
    os.replace(port_file + ".tmp", port_file)  # the test polls for it: never let it read half a file
    server.wait()
    return fleetgen_threads()
