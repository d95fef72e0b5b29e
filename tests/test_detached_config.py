"""Detached jobs' config: what they ask of Slurm and what is refused before anything is submitted."""
import subprocess
import sys

from fleetgen.conf.schema import LaunchConfig
from fleetgen.launcher.config import compose_recipe
from fleetgen.slurm.submission import make_executor, render_sbatch
from omegaconf import OmegaConf

LAUNCH = [sys.executable, "-m", "fleetgen.launcher"]


def config(recipe, *overrides):
    return LaunchConfig.model_validate(OmegaConf.to_container(compose_recipe(recipe, list(overrides))))


def test_a_detached_job_is_warned_in_time_to_drain(tmp_path):
    """USR2 comes batch.drain_timeout_s + job.grace_period_s before the end: 90 s with the defaults."""
    assert "#SBATCH --signal=USR2@90\n" in render_sbatch(config("tiny_slurm", "detach=true"), tmp_path / "%j")
    assert "#SBATCH --signal=USR2@25\n" in render_sbatch(
        config("tiny_slurm", "detach=true", "batch.drain_timeout_s=15", "job.grace_period_s=10"), tmp_path / "%j")
    # a job with its launcher attached only unwinds its ranks
    assert "#SBATCH --signal=USR2@30\n" in render_sbatch(config("tiny_slurm"), tmp_path / "%j")


def test_time_outs_requeue_up_to_max_requeues(tmp_path):
    local = make_executor(config("tiny", "detach=true", "job.max_requeues=7"), tmp_path / "%j")
    assert local.max_num_timeout == 7
    slurm = make_executor(config("tiny_slurm", "detach=true", "job.max_requeues=5"), tmp_path / "%j")
    assert slurm._executor.max_num_timeout == 5


def test_a_detached_server_is_refused_before_submission(tmp_path):
    result = subprocess.run([*LAUNCH, "tiny", "detach=true", "mode=serve", "job.folder=jobs"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "detach=true runs a batch inside the job" in result.stderr
    assert not (tmp_path / "jobs").exists()


def test_a_bad_input_is_refused_before_a_detached_job_is_submitted(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    result = subprocess.run([*LAUNCH, "tiny", "detach=true", "batch.input=in.jsonl", "job.folder=jobs"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "line 2" in result.stderr
    assert not (tmp_path / "jobs").exists()


def test_status_names_what_it_cannot_find(tmp_path):
    result = subprocess.run([*LAUNCH, "status", "--folder", "jobs"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "no job was submitted with job.folder=jobs" in result.stderr
    result = subprocess.run([*LAUNCH, "logs", "12345", "--folder", "jobs"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "12345: not a job's id or folder" in result.stderr
