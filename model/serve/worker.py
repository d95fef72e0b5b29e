"""One rank of a job: join the others, load this rank's shard, then serve (the replica's leader) or follow."""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from fleetgen.conf.schema import LaunchConfig, Model
from fleetgen.model.checkpoint.open import open_checkpoint
from fleetgen.model.serve.engine import Engine
from fleetgen.model.load import build_generator, startup_report
from fleetgen.model.parallel import ParallelState, cpu_threads
from fleetgen.model.serve.server import Server
from fleetgen.slurm.environment import RankEnvironment
from fleetgen.slurm.rendezvous import rendezvous


def run_rank(cfg: LaunchConfig, folder: str) -> None:
    """The function submitit runs on every task, with the launcher's validated config."""
    env = RankEnvironment.detect()
    torch.set_num_threads(cpu_threads(cfg.cluster.cpus_per_task, cfg.ranks_per_node))
    job_folder = Path(folder) / str(env.job_id)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            init_method=rendezvous(job_folder, env, timeout_s=cfg.server.health_timeout_s),
                            rank=env.global_rank, world_size=env.world_size,
                            timeout=timedelta(seconds=cfg.server.dist_timeout_s))
    try:
        ps = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline)
        _log(ps, f"on node {env.hostnames[env.node_rank]} ({env.cluster} job {env.job_id}), started "
                 f"{time.time() - psutil.Process().create_time():.1f} s after its process, {torch.get_num_threads()} "
                 "threads")
        if ps.world_rank == ps.first_rank:
            _lead(cfg, ps, env, job_folder)
        else:
            _engine(cfg.model, ps).follow()
    finally:
        dist.destroy_process_group()


def _engine(model: Model, ps: ParallelState) -> Engine:
    started = time.monotonic()
    source = open_checkpoint(Path(model.checkpoint), format=model.format, tokenizer=model.tokenizer)
    generator = build_generator(source, ps, model.precision, model.max_batch, model.max_seq_len, model.compile)
    _log(ps, startup_report(generator))
    engine = Engine(generator, source.tokenizer(), ps, source.config)
    loaded = time.monotonic()
    engine.warm_up()
    _log(ps, f"loaded in {loaded - started:.1f} s, warmed up in {time.monotonic() - loaded:.1f} s")
    return engine


def _lead(cfg: LaunchConfig, ps: ParallelState, env: RankEnvironment, job_folder: Path) -> None:
    """The leader answers /health (503) while every rank loads, so clients see the job is alive."""
    server = Server(cfg.server.host, cfg.server.port, api_key=cfg.server.api_key,
                    max_body_bytes=cfg.server.max_body_bytes, model_name=cfg.recipe)
    host = "127.0.0.1" if cfg.cluster.kind == "local" else env.hostnames[env.node_rank]
    _write_atomically(job_folder / f"server-{ps.replica}.json",
                      json.dumps({"url": f"http://{host}:{server.port}", "replica": ps.replica}))
    try:
        engine = _engine(cfg.model, ps)
    except Exception as e:
        server.fail(f"{type(e).__name__}: {e}")
        raise
    server.attach(engine)
    _log(ps, f"serving on port {server.port}")
    server.wait()


def _log(ps: ParallelState, message: str) -> None:
    print(f"rank {ps.world_rank} (replica {ps.replica}, tensor {ps.tp_rank}, stage {ps.pp_rank}): {message}",
          flush=True)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
