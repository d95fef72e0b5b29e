"""Containers without a runtime: each runtime's arguments, the mounts, the overlay's contents, the rank's check.

The real runtime (charliecloud on the local Slurm cluster) is exercised in test_container_runtime.py.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from packaging.tags import parse_tag

import fleetgen.conf

from fleetgen.conf.schema import Container, LaunchConfig
from fleetgen.launcher.errors import LaunchError
from fleetgen.slurm import container_overlay
from fleetgen.slurm.container import container_python, container_srun_args, make_mount_points, read_only_paths
from fleetgen.slurm.container_overlay import (Target, needed_distributions, overlay_folder, prepare_overlay)
from fleetgen.slurm.submission import render_sbatch

REPO = Path(__file__).resolve().parent.parent
JOBS = Path("/shared/jobs/%j")
SLURM = ["cluster=slurm", "cluster.gpus_per_node=1", "model.checkpoint=/models/ckpt",
         "container.overlay=/shared/overlays"]
NEMO = [*SLURM, "container=nemo"]
CH = [*SLURM, "container=charliecloud", "container.image=/images/torch"]


def composed(*overrides: str) -> LaunchConfig:
    with initialize_config_dir(config_dir=str(Path(fleetgen.conf.__path__[0])), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=test", *overrides])
    return LaunchConfig.model_validate(OmegaConf.to_container(cfg))


def test_pyxis_mounts_the_checkpoint_tokenizer_and_overlay_read_only():
    cfg = composed(*NEMO, "model.tokenizer=/tok/tokenizer.model", "container.mounts=[/data:/data]")
    overlay = overlay_folder(cfg.container)
    assert overlay == Path("/shared/overlays/nvcr.io_nvidia_nemo_24.05-fleetgen-0.1.0")
    assert container_srun_args(cfg.container, JOBS, read_only_paths(cfg, overlay)) == [
        "--container-image=nvcr.io/nvidia/nemo:24.05",
        f"--container-mounts=/data:/data,/shared/jobs:/shared/jobs,/models/ckpt:/models/ckpt:ro,"
        f"/tok/tokenizer.model:/tok/tokenizer.model:ro,{overlay}:{overlay}:ro",
        "--container-workdir=/shared/jobs", "--no-container-mount-home"]
    # PYTHONPATH is set on the command: pyxis lets an image's own value win over the job's environment.
    assert container_python(cfg, JOBS, overlay) == \
        f"env PYTHONPATH={overlay} python3 -u -m fleetgen.slurm.container_entry nvcr.io/nvidia/nemo:24.05"


def test_a_path_already_mounted_at_the_same_place_is_not_mounted_again():
    cfg = composed(*NEMO, "container.mounts=[/models:/models:ro,/shared:/shared]", "container.overlay=null")
    assert container_srun_args(cfg.container, JOBS, read_only_paths(cfg, None))[1] == \
        "--container-mounts=/models:/models:ro,/shared:/shared"
    # Mounted elsewhere inside is not the same place: the checkpoint is still mounted at its own path.
    cfg = composed(*NEMO, "container.mounts=[/models:/model]", "container.overlay=null")
    assert "/models/ckpt:/models/ckpt:ro" in container_srun_args(cfg.container, JOBS, read_only_paths(cfg, None))[1]


def test_without_an_overlay_the_image_python_runs_submitit_directly():
    cfg = composed(*NEMO, "container.overlay=null")
    assert overlay_folder(cfg.container) is None
    assert container_python(cfg, JOBS, None) == "python3"


def test_the_dry_run_shows_every_mount(tmp_path):
    script = render_sbatch(composed(*NEMO, "model.tokenizer=/tok/t.model"), JOBS)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    for path in ["/shared/jobs", "/models/ckpt", "/tok/t.model", "/shared/overlays/nvcr.io_nvidia_nemo_24.05"]:
        assert f",{path}" in srun or f"={path}" in srun, (path, srun)
    assert srun.endswith("env PYTHONPATH=/shared/overlays/nvcr.io_nvidia_nemo_24.05-fleetgen-0.1.0 python3 -u -m "
                         "fleetgen.slurm.container_entry nvcr.io/nvidia/nemo:24.05 -u -m submitit.core._submit "
                         "/shared/jobs/%j")


def test_charliecloud_runs_the_ranks_through_ch_run():
    cfg = composed(*CH, "container.mounts=[/data:/in]", "container.workdir=/in", "container.mount_home=true")
    overlay = overlay_folder(cfg.container)
    assert container_srun_args(cfg.container, JOBS, read_only_paths(cfg, overlay)) == []
    assert shlex.split(container_python(cfg, JOBS, overlay)) == [
        "ch-run", "--bind=/etc/hosts:/etc/hosts", "--bind=/data:/in", "--bind=/shared/jobs:/shared/jobs",
        "--bind=/models/ckpt:/models/ckpt", f"--bind={overlay}:{overlay}", "--cd=/in", "--home",
        f"--set-env=PYTHONPATH={overlay}", "/images/torch", "--", "python3", "-u", "-m",
        "fleetgen.slurm.container_entry", "/images/torch"]
    # No overlay: the login node's PYTHONPATH, which ch-run would pass on, names nothing inside the image.
    cfg = composed(*CH, "container.overlay=null")
    assert "--unset-env=PYTHONPATH" in shlex.split(container_python(cfg, JOBS, None))
    assert render_sbatch(cfg, JOBS).splitlines()[-1].endswith(
        "--cd=/shared/jobs --unset-env=PYTHONPATH /images/torch -- python3 -u -m submitit.core._submit /shared/jobs/%j")


def test_charliecloud_refuses_paths_under_the_shared_tmp():
    cfg = composed(*CH)
    with pytest.raises(LaunchError, match=r"/tmp/jobs cannot be mounted at /tmp/jobs, because ch-run shares the "
                                          r"node's own /tmp there"):
        container_python(cfg, "/tmp/jobs/%j", None)


def test_mount_points_are_made_in_a_directory_image(tmp_path):
    image = tmp_path / "image"
    (image / "usr").mkdir(parents=True)
    from fleetgen.slurm.container import Mount

    source_file = tmp_path / "tokenizer.model"
    source_file.write_text("x")
    make_mount_points(str(image), [Mount("/etc/hosts", "/etc/hosts"), Mount(str(tmp_path), "/data/in"),
                                   Mount(str(source_file), "/tok/tokenizer.model")])
    assert (image / "etc/hosts").is_file() and (image / "data/in").is_dir()
    assert (image / "tok/tokenizer.model").is_file()


def test_bad_container_fields_name_themselves():
    with pytest.raises(ValueError, match=r"container.mounts\[0\]=':/x'"):
        container_srun_args(composed(*NEMO, "container.mounts=[:/x]").container, JOBS)
    with pytest.raises(Exception, match="runtime"):
        composed(*NEMO, "container.runtime=docker")
    with pytest.raises(Exception, match="python_version"):
        composed(*NEMO, "container.python_version=3")


def _target(python, glibc=(2, 36)):
    return Target(python, "x86_64", glibc)


def test_wheel_tags_decide_what_the_launcher_can_copy():
    def fits(tag, target):
        return bool(set(parse_tag(tag)) & target.tags())

    assert fits("py3-none-any", _target((3, 10)))
    assert fits("cp310-abi3-manylinux_2_17_x86_64", _target((3, 11)))
    assert fits("cp311-cp311-manylinux_2_28_x86_64", _target((3, 11)))
    assert not fits("cp311-cp311-manylinux_2_28_x86_64", _target((3, 10)))
    assert not fits("cp311-cp311-manylinux_2_28_x86_64", _target((3, 11), glibc=(2, 27)))
    assert fits("cp311-cp311-manylinux2014_x86_64", _target((3, 11), glibc=(2, 17)))
    assert not fits("cp311-cp311-manylinux_2_28_aarch64", _target((3, 11)))


def names(dists):
    return {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in dists}


def test_the_overlay_holds_what_an_unprobed_image_lacks_for_its_python():
    copied, fetched = needed_distributions(_target((3, 10), container_overlay.ASSUMED_GLIBC), None)
    assert {"submitit", "hydra-core", "omegaconf", "pydantic", "fastapi", "uvicorn", "httpx"} <= names(copied)
    assert not {"torch", "numpy", "fleetgen"} & (names(copied) | {re.split(r"[=<>!~]", f)[0] for f in fetched})
    # Built for the launcher's Python only: fetched at the launcher's version for the image's.
    assert "pydantic-core==" + __import__("importlib.metadata").metadata.version("pydantic-core") in fetched
    # Needed on 3.10 only (a marker), so not in the launcher's 3.11 environment: fetched by requirement.
    assert any(f.startswith("exceptiongroup") for f in fetched)


def test_what_a_probed_image_has_is_not_added():
    everything, _ = needed_distributions(_target((3, 11)), {})
    assert {"numpy", "pydantic-core", "pyyaml"} <= names(everything)  # the launcher's wheels fit Python 3.11
    from importlib import metadata

    has = {"numpy": metadata.version("numpy"), "pydantic": metadata.version("pydantic"), "pyyaml": "5.0"}
    copied, fetched = needed_distributions(_target((3, 11)), has)
    assert "numpy" not in names(copied) and "pydantic" not in names(copied)
    assert "pyyaml" in names(copied)  # the image's 5.0 is older than omegaconf needs
    assert fetched == []


def test_an_image_with_this_fleetgen_gets_no_overlay(tmp_path):
    from importlib import metadata

    container = Container(image="/images/x", runtime="charliecloud", overlay=str(tmp_path))
    probe = {"python": "3.11.2", "machine": "x86_64", "libc": ["glibc", "2.36"],
             "distributions": {"fleetgen": metadata.version("fleetgen")}, "torch": "2.13.0", "torch_error": None}
    assert prepare_overlay(container, probe) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_pip_builds_for_the_image_python_from_container_wheels(tmp_path, monkeypatch):
    """Offline: a pure wheel from this machine's index, installed for Python 3.10 from container.wheels."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels),
                    "annotated-doc"], check=True)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    container = Container(image="img", wheels=str(wheels))
    container_overlay._pip_install(["annotated-doc"], _target((3, 10)), container, tmp_path / "out")
    assert list((tmp_path / "out").glob("annotated_doc-*.dist-info"))
    with pytest.raises(LaunchError, match=r"container.image=img: could not get wheels for Python 3.10 on x86_64, "
                                          r"glibc 2.36 of no-such-dist==1 from container.wheels="):
        container_overlay._pip_install(["no-such-dist==1"], _target((3, 10)), container, tmp_path / "out")


def test_fleetgen_packages_are_pyprojects():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    top = {name.split(".")[1] for name in pyproject["tool"]["setuptools"]["packages"]}
    assert top == set(container_overlay.FLEETGEN_PACKAGES)


def fake_torch(tmp_path, error):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(f"raise ImportError({error!r})\n")
    return {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}


def test_a_rank_in_an_image_without_torch_names_the_image(tmp_path):
    """pyxis images cannot be probed at submission: the first rank's start says what is missing."""
    result = subprocess.run([sys.executable, "-m", "fleetgen.slurm.container_entry", "nvcr.io/x:1", "-u", "-m",
                             "submitit.core._submit", str(tmp_path)], env=fake_torch(tmp_path, "libcuda.so.1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "container image nvcr.io/x:1 cannot run fleetgen's ranks: torch does not import (ImportError: " \
           "libcuda.so.1)" in result.stderr


@pytest.mark.slow
def test_a_rank_in_a_usable_image_hands_over_to_submitit(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fleetgen.slurm.container_entry", "img", "-u", "-m",
                             "submitit.core._submit", str(tmp_path / "missing")], capture_output=True, text=True,
                            timeout=120)
    assert f"in container image img: {sys.executable} (Python " in result.stdout
    assert "submitit" in result.stderr  # submitit's own entry point ran and complained about the folder
    result = subprocess.run([sys.executable, "-m", "fleetgen.slurm.container_entry", "img"], capture_output=True,
                            text=True, timeout=60)
    assert "expected IMAGE -u -m submitit.core._submit FOLDER" in result.stderr


def test_the_probe_names_what_the_image_lacks():
    from fleetgen.slurm.container_probe import problems

    report = {"python": "3.8.10", "torch": None, "torch_error": "ModuleNotFoundError: No module named 'torch'"}
    assert problems(report) == ["its python3 is 3.8.10; fleetgen needs Python >= 3.10",
                                "torch does not import (ModuleNotFoundError: No module named 'torch')"]
    assert problems({**report, "python": "3.10.12", "torch": "2.3.0a0"}) == []


def test_the_probe_runs_alone_in_a_plain_interpreter():
    source = (REPO / "slurm" / "container_probe.py").read_text()
    result = subprocess.run([sys.executable, "-I", "-c", source], capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert report["python"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}.")
    assert report["torch"] and "torch" in report["distributions"]


@pytest.mark.slow
def test_the_overlay_is_built_once_reused_and_rebuilt_when_fleetgen_changes(tmp_path, monkeypatch, capsys):
    container = Container(image="nvcr.io/nvidia/nemo:24.05", python_version=f"3.{sys.version_info[1]}",
                          overlay=str(tmp_path))
    folder = prepare_overlay(container, None)
    assert "container: built the overlay" in capsys.readouterr().err
    assert not (folder / "numpy").exists() and not (folder / "torch").exists()  # the image's own
    # Self-sufficient but for the image's torch and numpy: no site-packages (-S), only the overlay.
    modules = "fleetgen.conf.schema, fleetgen.slurm.container_entry, submitit, hydra, omegaconf, pydantic, " \
              "fastapi, uvicorn, httpx, yaml, safetensors, tokenizers, sentencepiece, psutil, tqdm"
    result = subprocess.run([sys.executable, "-S", "-c", f"import {modules}; print(fleetgen.conf.schema.__file__)"],
                            env={**os.environ, "PYTHONPATH": str(folder)}, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == str(folder / "fleetgen" / "conf" / "schema.py"), result.stderr
    assert prepare_overlay(container, None) == folder
    assert "container: reusing the overlay" in capsys.readouterr().err
    # An edited fleetgen (a development install) is a different overlay: rebuilt in place, the old one removed.
    monkeypatch.setattr(container_overlay, "fleetgen_digest", lambda: "edited")
    assert prepare_overlay(container, None) == folder
    assert "container: built the overlay" in capsys.readouterr().err
    assert json.loads((folder / container_overlay.MANIFEST).read_text())["fleetgen"] == "edited"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, f"{folder.name}.lock"]
