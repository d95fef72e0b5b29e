"""One rank of a job: join the others, load this rank's shard, then serve (the replica's leader) or follow.

Every rank's liveness is watched from start-up on (liveness.py); a rank that fails, for any reason, ends
its whole replica at once and exits non-zero, leaving its reason in the job folder for the launcher.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from fleetgen.conf.schema import LaunchConfig, Model
from fleetgen.model.chat_template import model_chat_template
from fleetgen.model.checkpoint.open import open_checkpoint
from fleetgen.model.serve.engine import Engine
from fleetgen.model.load import build_generator, startup_report
from fleetgen.model.parallel import ParallelState, cpu_threads, device_name
from fleetgen.model.serve.liveness import Liveness
from fleetgen.model.serve.server import Server
from fleetgen.slurm.control_token import read_token
from fleetgen.slurm.environment import RankEnvironment
from fleetgen.slurm.job_folder import JobPaths, write_atomically
from fleetgen.slurm.rank_exit import write_exit
from fleetgen.slurm.rendezvous import rendezvous

IDLE_SIGNALS_PER_TIMEOUT = 4  # an idle leader signals its followers this often per server.dist_timeout_s


def run_rank(cfg: LaunchConfig, folder: str) -> None:
    """The function submitit runs on every task, with the launcher's validated config."""
    entered = time.monotonic()
    startup_s = {"imports": time.time() - psutil.Process().create_time()}  # the interpreter, torch, fleetgen
    env = RankEnvironment.detect()
    torch.set_num_threads(cpu_threads(cfg.cluster.cpus_per_task, cfg.ranks_per_node))
    job_folder = Path(folder) / str(env.job_id)
    on_gpu = bool(cfg.cluster.gpus_per_node)  # the launcher placed one rank on each GPU (launcher/gpus.py)
    if on_gpu and torch.cuda.device_count() <= env.local_rank:  # never fall back to the CPU unasked
        raise RuntimeError(f"cluster.gpus_per_node={cfg.cluster.gpus_per_node}: local rank {env.local_rank} needs "
                           f"cuda:{env.local_rank}, but CUDA shows {torch.cuda.device_count()} GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if on_gpu:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo",
                            init_method=rendezvous(job_folder, env, timeout_s=cfg.server.health_timeout_s),
                            rank=env.global_rank, world_size=env.world_size,
                            timeout=timedelta(seconds=cfg.server.dist_timeout_s))
    ps = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline, timeout_s=cfg.server.dist_timeout_s)
    startup_s["rendezvous"] = time.monotonic() - entered
    node = env.hostnames[env.node_rank] if env.cluster == "slurm" else socket.gethostname()
    _log(ps, f"on node {node} ({env.cluster} job {env.job_id}), device {device_name(ps.device)}, started "
             f"{startup_s['imports']:.1f} s after its process, {torch.get_num_threads()} threads")
    liveness = Liveness.start(ps, node, _reachable_host(cfg, env), cfg.server.heartbeat_timeout_s,
                              cfg.server.step_timeout_s, job_folder)
    try:
        if ps.world_rank == ps.first_rank:
            _lead(cfg, ps, env, job_folder, liveness, startup_s)
        else:
            engine = _build_engine(cfg, ps, startup_s)
            engine.follow()  # warms up first
    except Exception as e:  # the traceback goes to this rank's stderr; the reason to the replica and launcher
        traceback.print_exc()
        liveness.fail(f"rank {ps.world_rank} on {node}: {type(e).__name__}: {e}")
    liveness.close()
    dist.destroy_process_group()
    write_exit(job_folder, ps.world_rank, node, None)


def _build_engine(cfg: LaunchConfig, ps: ParallelState, startup_s: dict[str, float]) -> Engine:
    """Load this rank's shard; the engine warms up (and captures its GPU graphs) on the thread that serves."""
    model: Model = cfg.model
    started = time.monotonic()
    source = open_checkpoint(Path(model.checkpoint), format=model.format, tokenizer=model.tokenizer)
    # one lane a pipeline stage, so that every stage has a step to run while the others run theirs
    generator = build_generator(source, ps, model.precision, model.max_batch, model.max_seq_len, model.compile,
                                lanes=ps.pp_size, kv_cache_gb=model.kv_cache_gb)
    _log(ps, startup_report(generator))
    engine = Engine(generator, source.tokenizer(), ps, source.config,
                    idle_signal_s=cfg.server.dist_timeout_s / IDLE_SIGNALS_PER_TIMEOUT,
                    prefix_caching=model.prefix_caching)
    startup_s["load"] = time.monotonic() - started
    engine.startup_s.update(startup_s)
    _log(ps, f"loaded in {startup_s['load']:.1f} s")
    return engine


def _lead(cfg: LaunchConfig, ps: ParallelState, env: RankEnvironment, job_folder: Path,
          liveness: Liveness, startup_s: dict[str, float]) -> None:
    """The leader answers /health (503) while every rank loads, so clients see the job is alive."""
    port = cfg.server.port + ps.replica if cfg.server.port else 0  # replicas may share a node
    server = Server(cfg.server.host, port, api_key=cfg.server.api_key, max_body_bytes=cfg.server.max_body_bytes,
                    model_name=cfg.recipe, control_token=read_token(job_folder, cfg.server.health_timeout_s),
                    private=cfg.mode == "batch",
                    chat_template=model_chat_template(cfg.model.chat_template, cfg.model.checkpoint,
                                                      cfg.model.tokenizer))
    liveness.on_failure = server.fail
    write_atomically(JobPaths(job_folder).server(ps.replica),
                     json.dumps({"url": f"http://{_reachable_host(cfg, env)}:{server.port}", "replica": ps.replica}))
    engine = _build_engine(cfg, ps, startup_s)
    liveness.engine = engine
    server.attach(engine)
    if engine.wait_ready():
        phases = ", ".join(f"{phase} {s:.1f} s" for phase, s in engine.startup_s.items())
        _log(ps, f"serving on port {server.port}; devices: {'; '.join(engine.devices)}; start-up: {phases}")
    server.wait(on_engine_failure=liveness.fail_engine)


def _reachable_host(cfg: LaunchConfig, env: RankEnvironment) -> str:
    return "127.0.0.1" if cfg.cluster.kind == "local" else env.hostnames[env.node_rank]


def _log(ps: ParallelState, message: str) -> None:
    print(f"rank {ps.world_rank} (replica {ps.replica}, tensor {ps.tp_rank}, stage {ps.pp_rank}): {message}",
          flush=True)
