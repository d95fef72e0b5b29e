"""Rank discovery (slurm/environment.py): parsed from each launcher's variables, then exercised by real jobs."""
import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import submitit
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import fleetgen.conf
from fleetgen.conf.schema import LaunchConfig
from fleetgen.slurm.environment import RankEnvironment
from fleetgen.slurm.rendezvous import rendezvous
from fleetgen.slurm.submission import make_executor
from tests.distributed import wait_for_results

CONF_DIR = str(Path(fleetgen.conf.__path__[0]))
LAUNCHER_VARIABLES = ("SUBMITIT_EXECUTOR", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                      "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher's variables, even when the suite itself runs inside a Slurm job or under torchrun."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_slurm_variables(clean_env):
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "12",
                        "SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "1", "SLURM_PROCID": "5",
                        "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu-a[07-08],login3",
                        "SLURM_RESTART_COUNT": "2"}.items():
        clean_env.setenv(name, value)
    assert RankEnvironment.detect() == RankEnvironment(
        global_rank=5, local_rank=1, world_size=12, node_rank=1, num_nodes=3,
        hostnames=("gpu-a07", "gpu-a08", "login3"), job_id="4242", first_host="gpu-a07", cluster="slurm",
        restart_count=2)


def test_slurm_node_list_that_disagrees_with_the_node_count_is_an_error(clean_env):
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "2",
                        "SLURM_JOB_NODELIST": "node[1-3]"}.items():
        clean_env.setenv(name, value)
    with pytest.raises(RuntimeError, match="SLURM_JOB_NUM_NODES=2"):
        RankEnvironment.detect()


def test_submitit_local_variables(clean_env):
    for name, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "31337",
                        "SUBMITIT_LOCAL_NTASKS": "4", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
                        "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "3",
                        "SUBMITIT_LOCAL_LOCALID": "3"}.items():
        clean_env.setenv(name, value)
    assert RankEnvironment.detect() == RankEnvironment(
        global_rank=3, local_rank=3, world_size=4, node_rank=0, num_nodes=1, hostnames=("127.0.0.1",),
        job_id="31337", first_host="127.0.0.1", cluster="local")


def test_torchrun_variables(clean_env):
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "GROUP_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500",
                        "TORCHELASTIC_RUN_ID": "run7", "TORCHELASTIC_RESTART_COUNT": "1"}.items():
        clean_env.setenv(name, value)
    assert RankEnvironment.detect() == RankEnvironment(
        global_rank=3, local_rank=1, world_size=4, node_rank=1, num_nodes=2, hostnames=("10.1.2.3",),
        job_id="run7", first_host="10.1.2.3", cluster="torchrun", restart_count=1)


def test_torchrun_without_a_run_id_uses_the_master_port(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("MASTER_PORT", "29511")
    clean_env.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default
    assert RankEnvironment.detect().job_id == "torchrun-29511"


def test_a_plain_process_is_rank_0_of_1(clean_env):
    env = RankEnvironment.detect()
    assert (env.global_rank, env.world_size, env.num_nodes, env.first_host) == (0, 1, 1, "127.0.0.1")
    assert env.job_id == f"pid{os.getpid()}"


def rank_report(folder: str) -> dict:
    """Runs in every task of a real job: discover, rendezvous, all-reduce, and say where it ran."""
    env = RankEnvironment.detect()
    init_method = rendezvous(Path(folder) / env.job_id, env, timeout_s=60)
    dist.init_process_group("gloo", init_method=init_method, rank=env.global_rank, world_size=env.world_size,
                            timeout=timedelta(seconds=60))
    try:
        total = torch.tensor([env.global_rank + 1.0])  # (1,)
        dist.all_reduce(total)
    finally:
        dist.destroy_process_group()
    return {"env": env, "node": os.environ.get("SLURMD_NODENAME"), "sum": total.item(),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


@pytest.mark.slow
def test_four_ranks_on_two_slurm_nodes_all_reduce(tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(nodes=2, tasks_per_node=2, timeout_min=5, slurm_partition="debug")
    job = executor.submit(rank_report, str(tmp_path))
    try:
        reports = wait_for_results(job)
    finally:
        job.cancel(check=False)
    assert [r["env"].global_rank for r in reports] == [0, 1, 2, 3]
    assert [r["node"] for r in reports] == ["node1", "node1", "node2", "node2"]
    assert [r["env"].node_rank for r in reports] == [0, 0, 1, 1]
    assert [r["env"].local_rank for r in reports] == [0, 1, 0, 1]
    assert [r["sum"] for r in reports] == [10.0] * 4  # 1 + 2 + 3 + 4
    assert {(r["env"].hostnames, r["env"].first_host, r["env"].job_id) for r in reports} == {
        (("node1", "node2"), "node1", job.job_id)}


def gpu_report() -> tuple[str, str]:
    return os.environ["SLURMD_NODENAME"], os.environ.get("CUDA_VISIBLE_DEVICES", "")


@pytest.mark.slow
def test_slurm_jobs_see_the_fake_gpus(tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(nodes=2, tasks_per_node=1, gpus_per_node=2, timeout_min=5,
                               slurm_partition="debug")
    job = executor.submit(gpu_report)
    try:
        assert wait_for_results(job) == [("node1", "0,1"), ("node2", "0,1")]
    finally:
        job.cancel(check=False)


@pytest.mark.slow
def test_ranks_of_a_local_executor_job_all_reduce(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model.checkpoint=/x", "recipe=test", "parallel.tensor=2",
                                           "cluster.time_min=5", "cluster.gpus_per_node=0"])
    job = make_executor(LaunchConfig.model_validate(OmegaConf.to_container(cfg)), tmp_path / "%j").submit(
        rank_report, str(tmp_path))
    try:
        reports = wait_for_results(job)
    finally:
        job.cancel(check=False)
    envs = [r["env"] for r in reports]
    assert envs == [replace(envs[0], global_rank=rank, local_rank=rank) for rank in range(2)]
    assert (envs[0].world_size, envs[0].first_host, envs[0].cluster, envs[0].job_id) == (
        2, "127.0.0.1", "local", job.job_id)
    assert [r["sum"] for r in reports] == [3.0, 3.0]
