"""Ranks inside a real container runtime: charliecloud's ch-run on the local Slurm cluster.

The images are built by tests/container_image.py from Debian's packages (python3, pip, the CPU torch; never
fleetgen), once per CI run. The launcher probes the image, builds the overlay of what it lacks, and each rank
runs in `ch-run IMAGE` with the job folder, the checkpoint and the overlay bound at their own paths.
ch-run shares the node's /tmp with the container, so these tests keep their folders under /var/tmp.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fleetgen.launcher.config import DATA_DIR
from tests.container_image import images, install_tools

pytestmark = pytest.mark.slow
JOB_NAME = "fleetgen-container-test"


@pytest.fixture(scope="module")
def image():
    return images()


@pytest.fixture
def work():
    """A folder outside /tmp with its own copy of the tiny checkpoint, which the ranks can only read mounted."""
    folder = Path(tempfile.mkdtemp(prefix="fleetgen-container-", dir="/var/tmp"))
    shutil.copytree(Path(DATA_DIR) / "tiny-gpt2", folder / "models" / "tiny-gpt2")
    yield folder
    left = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-o", "%i"], capture_output=True, text=True).stdout.split()
    if left:
        subprocess.run(["scancel", *left], check=False)
    shutil.rmtree(folder, ignore_errors=True)
    assert left == [], f"jobs left in the queue: {left}"


def launch(work: Path, image: Path, *overrides: str) -> subprocess.CompletedProcess:
    """tiny_slurm at 2 nodes × tensor 2 (one rank per node), inside the image."""
    command = [sys.executable, "-m", "fleetgen.launcher", "tiny_slurm", *overrides, "container=charliecloud",
               f"container.image={image}", f"container.overlay={work / 'overlays'}",
               f"model.checkpoint={work / 'models' / 'tiny-gpt2'}", "job.folder=jobs", f"job.name={JOB_NAME}",
               "parallel.pipeline=1", "cluster.tasks_per_node=1", "server.health_timeout_s=240"]
    env = {**os.environ, "USER": os.environ.get("USER") or "root"}  # ch-run refuses to start without $USER
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def rank_logs(work: Path) -> dict[str, str]:
    """The newest job's stdout per rank."""
    job = max((work / "jobs").glob("[0-9]*"), key=lambda p: int(p.name))
    return {p.name: p.read_text() for p in sorted(job.glob("*_log.out"))}


def test_two_nodes_tensor2_serve_batches_in_the_image_and_the_overlay_is_reused(image, work):
    first_run = [f"batch.output={work / 'first.jsonl'}", "generation.tokens_to_generate=8"]
    first = launch(work, image["torch"], *first_run)
    assert first.returncode == 0, first.stderr[-5000:]
    assert f"container: built the overlay {work / 'overlays'}" in first.stderr
    records = [json.loads(line) for line in (work / "first.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["completion_tokens"] > 0 for r in records)
    logs = rank_logs(work)
    assert len(logs) == 2
    overlay = next(p for p in (work / "overlays").iterdir() if p.is_dir())  # beside it: its .lock file
    for log in logs.values():
        # The image's interpreter (not this machine's), the image's torch, fleetgen from the overlay.
        assert f"in container image {image['torch']}: /usr/bin/python3 (Python 3.11." in log
        assert f"torch 2.13.0+cpu, fleetgen from {overlay}/fleetgen" in log
    assert "node1" in " ".join(logs.values()) and "node2" in " ".join(logs.values())
    # The dry run shows exactly what was submitted: ch-run, every bind, the overlay on PYTHONPATH.
    dry_run = launch(work, image["torch"], "--dry-run", *first_run)
    job = max((work / "jobs").glob("[0-9]*"), key=lambda p: int(p.name))
    submitted = (job / f"{job.name}_submission.sh").read_text()
    assert dry_run.stdout[dry_run.stdout.index("#!/bin/bash"):].strip() == submitted.strip()
    for bind in [work / "jobs", work / "models" / "tiny-gpt2", overlay]:
        assert f"--bind={bind}:{bind}" in submitted

    second = launch(work, image["torch"], f"batch.output={work / 'second.jsonl'}",
                    f"batch.input={DATA_DIR / 'tiny_prompts.jsonl'}", "generation.tokens_to_generate=4")
    assert second.returncode == 0, second.stderr[-5000:]
    assert f"container: reusing the overlay {overlay}" in second.stderr
    assert "built the overlay" not in second.stderr
    assert len((work / "second.jsonl").read_text().splitlines()) == 8


def test_an_image_without_torch_fails_at_submission_naming_it(image, work):
    result = launch(work, image["python"])
    assert result.returncode == 2
    assert f"container.image={image['python']} cannot run fleetgen's ranks: torch does not import " \
           "(ModuleNotFoundError: No module named 'torch')" in result.stderr
    assert "submitted job" not in result.stderr and not list((work / "jobs").glob("[0-9]*"))


def test_an_image_without_python_fails_at_submission_naming_it(work):
    install_tools()
    bare = work / "bare-image"
    for folder in ["usr", "bin", "dev", "proc", "sys", "etc", "tmp", "home", "mnt", "root"]:
        (bare / folder).mkdir(parents=True)
    for name in ["passwd", "group", "resolv.conf", "hosts"]:
        (bare / "etc" / name).touch()
    result = launch(work, bare)
    assert result.returncode == 2
    assert f"container.image={bare} cannot run fleetgen's ranks: its python3 did not start (" in result.stderr
    assert "python3" in result.stderr.rsplit("did not start", 1)[1]
    assert "submitted job" not in result.stderr
