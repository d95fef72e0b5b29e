"""Submission arguments (slurm/submission.py): golden files for executor parameters and sbatch scripts, then the
real cluster. After an intended change, `python3 tools/regold.py` rewrites the golden files."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from fleetgen.slurm.submission import (container_srun_args, executor_parameters, make_executor, mount_folder,
                                       render_sbatch)
from tests.distributed import wait_for_results
from tests.goldens import CASES, GOLDEN, JOB_FOLDER, composed, submission_text


@pytest.mark.parametrize("name", [f"{case}.{kind}" for case in sorted(CASES) for kind in ("json", "sbatch")])
def test_parameters_and_script_match_golden(name):
    assert submission_text(name) == (GOLDEN / name).read_text(), f"{name} differs (see tools/regold.py)"


def test_ranks_per_node():
    assert composed("parallel.tensor=2", "parallel.pipeline=3", "parallel.replicas=2").ranks_per_node == 12
    assert composed("cluster=slurm", "cluster.gpus_per_node=4", "parallel.tensor=4").ranks_per_node == 4
    assert composed("cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=3",
                    "parallel.replicas=3").ranks_per_node == 3
    with pytest.raises(ValueError, match="cluster.gpus_per_node is 0: set cluster.tasks_per_node"):
        composed("cluster=slurm", "cluster.gpus_per_node=0")


def test_local_parameters():
    assert executor_parameters(composed("parallel.tensor=2", "cluster.time_min=7", "cluster.gpus_per_node=0"),
                               JOB_FOLDER) == {"tasks_per_node": 2, "timeout_min": 7, "name": "fleetgen", "nodes": 1}
    # A local GPU run must ask for its GPUs: the local executor hides the rest.
    assert executor_parameters(composed("cluster.gpus_per_node=2", "parallel.tensor=2"),
                               JOB_FOLDER)["gpus_per_node"] == 2


def test_container_args():
    cfg = composed("cluster=slurm", "cluster.gpus_per_node=1", "container=nemo", "container.workdir=/work",
                   "container.mount_home=true",
                   "container.mounts=[/shared/fleetgen/jobs:/shared/fleetgen/jobs]")
    assert container_srun_args(cfg.container, JOB_FOLDER) == [
        "--container-image=nvcr.io/nvidia/nemo:24.05",
        "--container-mounts=/shared/fleetgen/jobs:/shared/fleetgen/jobs", "--container-workdir=/work"]
    assert container_srun_args(composed("cluster=slurm", "cluster.gpus_per_node=1").container, JOB_FOLDER) == []


def test_the_mounted_job_folder_is_the_part_that_exists_before_the_job(tmp_path, monkeypatch):
    assert mount_folder("/a/b/%j") == Path("/a/b")
    assert mount_folder("/a/%A_%a/c") == Path("/a")
    monkeypatch.chdir(tmp_path)
    assert mount_folder("jobs/%j") == tmp_path / "jobs"


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"container.mounts\[1\]='/a,/b'"):
        container_srun_args(composed("cluster=slurm", "cluster.gpus_per_node=1", "container=nemo",
                                     "container.mounts=['/x:/y','/a,/b']").container, JOB_FOLDER)
    with pytest.raises(ValueError, match="cluster.env.1BAD: not a valid environment variable name"):
        cfg = composed("cluster=slurm", "cluster.gpus_per_node=1")
        cfg.cluster.env["1BAD"] = "x"
        executor_parameters(cfg, JOB_FOLDER)


def sbatch_test_only(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_local_cluster_accepts_a_rendered_script(tmp_path):
    cfg = composed("cluster=slurm", "cluster.partition=debug", "cluster.gpus_per_node=2", "parallel.nodes=2",
                   "parallel.tensor=2", "parallel.pipeline=2", "cluster.setup=['echo setting up']",
                   "+cluster.env.FLEETGEN_TEST=1", "+cluster.sbatch_args.comment=golden")
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(cfg, tmp_path / "%j"))
    result = sbatch_test_only(script)
    assert result.returncode == 0, result.stderr
    assert re.search(r"to start at .* on nodes node\[1-2\] in partition debug", result.stderr), result.stderr
    # The same check refuses what the cluster cannot give: it is not a rubber stamp.
    script.write_text(render_sbatch(composed("cluster=slurm", "cluster.partition=debug", "parallel.tensor=8"),
                                    tmp_path / "%j"))
    assert sbatch_test_only(script).returncode != 0


def where_am_i() -> tuple[str, str]:
    return os.environ["SLURMD_NODENAME"], os.environ["FLEETGEN_TEST"]


@pytest.mark.slow
def test_the_submitted_script_is_the_rendered_one(tmp_path):
    cfg = composed("cluster=slurm", "cluster.partition=debug", "cluster.gpus_per_node=0",
                   "cluster.tasks_per_node=1", "parallel.nodes=2", "parallel.replicas=2", "cluster.time_min=5",
                   "+cluster.env.FLEETGEN_TEST=yes", "cluster.mem_gb=0.5")
    job = make_executor(cfg, tmp_path / "%j").submit(where_am_i)
    try:
        assert wait_for_results(job) == [("node1", "yes"), ("node2", "yes")]
    finally:
        job.cancel(check=False)
    submitted = (tmp_path / job.job_id / f"{job.job_id}_submission.sh").read_text()
    assert submitted == render_sbatch(cfg, tmp_path / "%j")
