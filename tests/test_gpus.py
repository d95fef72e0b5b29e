"""GPU placement without a GPU: this machine's GPUs found from each source, faked (launcher/gpus.py); local ranks
settled to one GPU each or refused before submission (launcher/validate.py); what submitit is asked for, and
what each local rank is shown (slurm/submission.py)."""
import os
from pathlib import Path

import pytest
import submitit

from fleetgen.launcher import cli
from fleetgen.launcher.errors import LaunchError
from fleetgen.launcher.gpus import MachineGpus, machine_gpus, run_nvidia_smi
from fleetgen.launcher.validate import place_local_ranks
from fleetgen.slurm.submission import executor_parameters, make_executor
from tests.distributed import wait_for_results
from tests.goldens import JOB_FOLDER, composed

NVIDIA_SMI_L = """GPU 0: NVIDIA H200 (UUID: GPU-3b1e6a3c-1111-2222-3333-444455556666)
GPU 1: NVIDIA H200 (UUID: GPU-9f0c2d7e-1111-2222-3333-444455556666)
  MIG 3g.71gb     Device  0: (UUID: MIG-5c2b1a0e-1111-2222-3333-444455556666)
"""


def no_nvidia_smi(args):
    return None


def never_asked(*args):
    raise AssertionError("this source should not have been asked")


def discover(env=None, nvidia_smi=no_nvidia_smi, proc="/nonexistent/nvidia/gpus"):
    return machine_gpus(env={} if env is None else env, nvidia_smi=nvidia_smi, proc=Path(proc))


@pytest.mark.parametrize("value, names", [
    ("0", ("0",)),
    ("2,3", ("2", "3")),
    (" 1 , 0 ", ("1", "0")),
    ("GPU-3b1e6a3c-1111,GPU-9f0c2d7e-2222", ("GPU-3b1e6a3c-1111", "GPU-9f0c2d7e-2222")),
    ("MIG-5c2b1a0e-1111", ("MIG-5c2b1a0e-1111",)),
    ("0,-1,1", ("0",)),  # CUDA stops at the first invalid entry
    ("", ()),
    ("-1", ()),
])
def test_cuda_visible_devices_is_what_the_ranks_would_see_and_nothing_else_is_asked(value, names):
    gpus = discover({"CUDA_VISIBLE_DEVICES": value}, nvidia_smi=never_asked)
    assert gpus.names == names
    assert gpus.source == (f"CUDA_VISIBLE_DEVICES={value}" if value else "CUDA_VISIBLE_DEVICES is empty")


def test_without_cuda_visible_devices_nvidia_smi_lists_the_gpus_but_not_their_mig_slices():
    asked = []

    def nvidia_smi(args):
        asked.append(args)
        return NVIDIA_SMI_L

    assert discover(nvidia_smi=nvidia_smi) == MachineGpus(("0", "1"), "nvidia-smi -L")
    assert asked == [["-L"]]


def test_without_nvidia_smi_the_drivers_proc_folder_counts_the_gpus(tmp_path):
    for bus in ("0000:19:00.0", "0000:3b:00.0", "0000:4c:00.0"):
        (tmp_path / bus).mkdir()
    assert discover(proc=tmp_path) == MachineGpus(("0", "1", "2"), str(tmp_path))
    assert discover(nvidia_smi=lambda args: "No devices were found\n", proc=tmp_path).names == ("0", "1", "2")


def test_a_machine_without_any_source_has_no_gpu(tmp_path):
    gpus = discover(proc=tmp_path / "absent")
    assert gpus.names == ()
    assert "CUDA_VISIBLE_DEVICES unset" in gpus.source and "nvidia-smi -L" in gpus.source
    assert discover(proc=tmp_path).names == ()  # the driver's folder there but empty


def fake_nvidia_smi(tmp_path, monkeypatch, body):
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_nvidia_smi_is_run_when_installed_and_a_hung_or_failing_one_is_given_up(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert run_nvidia_smi(["-L"]) is None  # not installed
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "GPU 0: Fake ($1)"')
    assert run_nvidia_smi(["-L"]) == "GPU 0: Fake (-L)\n"
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed'; exit 9")
    assert run_nvidia_smi(["-L"]) is None
    fake_nvidia_smi(tmp_path, monkeypatch, "exec sleep 30")
    assert run_nvidia_smi(["-L"], timeout_s=0.5) is None


def one_gpu():
    return MachineGpus(("0",), "CUDA_VISIBLE_DEVICES=0")


def no_gpu():
    return MachineGpus((), "CUDA_VISIBLE_DEVICES unset, no GPU from nvidia-smi -L, none in /proc/driver/nvidia/gpus")


def test_local_ranks_take_one_gpu_each_by_default():
    cfg = composed()
    assert cfg.cluster.gpus_per_node is None  # auto until the launcher settles it
    place_local_ranks(cfg, one_gpu)
    assert (cfg.cluster.gpus_per_node, cfg.cluster.visible_gpus) == (1, ["0"])
    cfg = composed("parallel.tensor=2", "parallel.replicas=2")
    place_local_ranks(cfg, lambda: MachineGpus(("2", "3", "5", "7", "8"), "CUDA_VISIBLE_DEVICES=2,3,5,7,8"))
    assert (cfg.cluster.gpus_per_node, cfg.cluster.visible_gpus) == (4, ["2", "3", "5", "7"])


def test_more_local_gpu_ranks_than_gpus_are_refused_naming_the_counts_and_the_keys():
    with pytest.raises(LaunchError) as caught:
        place_local_ranks(composed("parallel.tensor=2"), one_gpu)
    assert str(caught.value) == ("parallel.tensor × parallel.pipeline × parallel.replicas = 2 × 1 × 1 = 2 ranks, "
                                 "one GPU each, but this machine has 1 GPU (CUDA_VISIBLE_DEVICES=0): use fewer "
                                 "ranks, or cluster.gpus_per_node=0 to run them on CPU")


def test_a_gpu_count_asked_for_on_a_machine_without_gpus_is_refused_not_run_on_cpu():
    with pytest.raises(LaunchError, match=r"= 1 ranks, one GPU each, but this machine has no GPUs \(CUDA_VISIBLE_"
                                          r"DEVICES unset[^)]*\): cluster.gpus_per_node=0 to run them on CPU$"):
        place_local_ranks(composed("cluster.gpus_per_node=1"), no_gpu)


def test_cpu_said_explicitly_stays_cpu_without_looking_for_gpus():
    cfg = composed("cluster.gpus_per_node=0", "parallel.tensor=4")
    place_local_ranks(cfg, never_asked)
    assert (cfg.cluster.gpus_per_node, cfg.cluster.visible_gpus) == (0, None)


def test_a_machine_without_gpus_runs_local_ranks_on_cpu():
    cfg = composed("parallel.tensor=2")
    place_local_ranks(cfg, no_gpu)
    assert (cfg.cluster.gpus_per_node, cfg.cluster.visible_gpus) == (0, None)


def test_visible_gpus_given_are_used_instead_of_the_machines():
    cfg = composed("cluster.visible_gpus=[4,GPU-abc,6]", "parallel.pipeline=2")
    place_local_ranks(cfg, never_asked)
    assert (cfg.cluster.gpus_per_node, cfg.cluster.visible_gpus) == (2, ["4", "GPU-abc"])
    with pytest.raises(LaunchError, match=r"has 1 GPU \(cluster.visible_gpus=\['4'\]\)"):
        place_local_ranks(composed("cluster.visible_gpus=[4]", "parallel.pipeline=2"), never_asked)


def test_slurm_keeps_its_explicit_gpus_per_node():
    cfg = composed("cluster=slurm", "parallel.tensor=8")
    place_local_ranks(cfg, never_asked)
    assert (cfg.cluster.gpus_per_node, cfg.cluster.visible_gpus) == (8, None)


@pytest.mark.parametrize("overrides, words", [
    (["cluster.gpus_per_node=2"], "cluster.gpus_per_node=2 but parallel.tensor × parallel.pipeline × "
                                  "parallel.replicas = 1 × 1 × 1 = 1 ranks: a local run puts one rank on each GPU"),
    (["cluster.gpus_per_node=0", "cluster.visible_gpus=[1]"], "cluster.visible_gpus=['1'] but "
                                                               "cluster.gpus_per_node=0 runs on CPU"),
    (["cluster=slurm", "cluster.gpus_per_node=null"], "cluster.gpus_per_node is null"),
    (["cluster=slurm", "+cluster.visible_gpus=[0]"], "cluster.visible_gpus is set, but Slurm chooses"),
])
def test_gpu_counts_that_cannot_be_placed_are_refused_by_the_schema(overrides, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        composed(*overrides)


def settled(*overrides, machine=one_gpu):
    cfg = composed(*overrides)
    place_local_ranks(cfg, machine)
    return cfg


def test_submitits_local_parameters_carry_the_gpus():
    params = executor_parameters(settled("parallel.replicas=2", machine=lambda: MachineGpus(("2", "3"), "test")),
                                 JOB_FOLDER)
    assert params == {"tasks_per_node": 2, "timeout_min": 60, "name": "fleetgen", "nodes": 1, "gpus_per_node": 2,
                      "visible_gpus": ("2", "3")}
    assert "gpus_per_node" not in executor_parameters(settled(machine=no_gpu), JOB_FOLDER)  # CPU: every GPU hidden
    with pytest.raises(ValueError, match="cluster.gpus_per_node is null: the launcher settles it"):
        executor_parameters(composed(), JOB_FOLDER)


def test_the_local_executor_takes_gpus_by_index_or_uuid(tmp_path):
    cfg = settled("parallel.tensor=2", machine=lambda: MachineGpus(("GPU-aaa", "MIG-bbb"), "test"))
    executor = make_executor(cfg, tmp_path / "%j")
    assert (executor.parameters["gpus_per_node"], executor.parameters["visible_gpus"]) == (2, ("GPU-aaa", "MIG-bbb"))


def what_this_rank_sees():
    env = submitit.JobEnvironment()
    return env.local_rank, os.environ["CUDA_VISIBLE_DEVICES"]


def test_each_local_rank_is_shown_the_gpus_so_that_cuda_k_is_a_distinct_one(tmp_path):
    """The user's CUDA_VISIBLE_DEVICES=5,3 reaches the job as it is (submitit would write 0,1 by itself):
    rank k drives cuda:k, the k-th of them."""
    cfg = settled("parallel.tensor=2", "cluster.time_min=2",
                  machine=lambda: machine_gpus(env={"CUDA_VISIBLE_DEVICES": "5,3"}, nvidia_smi=never_asked))
    job = make_executor(cfg, tmp_path / "%j").submit(what_this_rank_sees)
    assert sorted(wait_for_results(job, timeout_s=120)) == [(0, "5,3"), (1, "5,3")]


def test_a_dry_run_shows_the_settled_gpus_and_warns_of_missing_ones(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    assert cli.main(["tiny", "--dry-run", "cluster.gpus_per_node=null", "parallel.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "  gpus_per_node: 2\n  visible_gpus:\n  - '6'\n  - '7'\n" in out and "# warning" not in out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    assert cli.main(["tiny", "--dry-run", "cluster.gpus_per_node=null", "parallel.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "# warning: parallel.tensor × parallel.pipeline × parallel.replicas = 2 × 1 × 1 = 2 ranks" in out
    assert "this machine has 1 GPU (CUDA_VISIBLE_DEVICES=6)" in out


def test_a_launch_with_too_few_gpus_is_refused_before_submission(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(cli, "submit", never_asked)
    monkeypatch.setattr(cli.detached, "submit", never_asked)
    code = cli.main(["tiny", "cluster.gpus_per_node=null", "parallel.replicas=2", f"job.folder={tmp_path}/jobs"])
    assert code == 2
    assert ("launch: error: parallel.tensor × parallel.pipeline × parallel.replicas = 1 × 1 × 2 = 2 ranks, one GPU "
            "each, but this machine has 1 GPU (CUDA_VISIBLE_DEVICES=0)") in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()
