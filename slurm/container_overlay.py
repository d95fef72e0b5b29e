"""What a container image lacks, prepared at submission: fleetgen and the dependencies the image does not have.

The overlay is a `pip install --target`-style folder, mounted read-only into the container and put first on the
ranks' PYTHONPATH; the image's own torch (with its CUDA, NCCL and apex) is always the one used. A distribution
is copied from the launcher's own environment when its wheel tags fit the image's Python and platform, and
installed by pip for that Python and platform otherwise (from container.wheels, or pip's configured index).
There is one folder per image and fleetgen version, reused by every job; its manifest records what it holds,
and a folder whose manifest differs from what is needed now (an image rebuilt at the same path, an edited
fleetgen in a development install) is rebuilt.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags, parse_tag
from packaging.utils import canonicalize_name

from fleetgen.conf.schema import Container
from fleetgen.launcher.errors import LaunchError

MANIFEST = "fleetgen-overlay.json"
FLEETGEN_PACKAGES = ("conf", "launcher", "model", "recipes", "slurm")  # pyproject's top-level packages
IMAGE_OWN = {"torch", "fleetgen"}  # never added: the image's torch is used; fleetgen is copied from its code
# Where the image cannot be looked into (pyxis), it is taken to have numpy too: its torch was built against its
# numpy, and another numpy first on the path would break torch's numpy interop.
ASSUMED_IN_TORCH_IMAGES = {"numpy"}
# unprobed images: NeMo 24.x is Ubuntu 22.04 (glibc 2.35), NGC images since 2020 Ubuntu 20.04 (2.31) or newer;
# 2.31 because llguidance (structured output) has no wheel for older ones since 1.7
ASSUMED_GLIBC = (2, 31)


@dataclass(frozen=True)
class Target:
    """The image's interpreter and platform, as wheel tags see them."""
    python: tuple[int, int]
    machine: str
    glibc: tuple[int, int]

    @classmethod
    def from_probe(cls, report: dict) -> Target:
        major, minor = (int(part) for part in report["python"].split(".")[:2])
        libc, version = report["libc"]
        glibc = tuple(int(part) for part in version.split(".")[:2]) if libc == "glibc" else (0, 0)
        return cls((major, minor), report["machine"], glibc)

    @classmethod
    def assumed(cls, python_version: str) -> Target:
        major, minor = (int(part) for part in python_version.split("."))
        return cls((major, minor), os.uname().machine, ASSUMED_GLIBC)

    def platforms(self) -> list[str]:
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        found = []
        for minor in range(self.glibc[1], 4, -1) if self.glibc[0] == 2 else []:
            found.append(f"manylinux_2_{minor}_{self.machine}")
            if minor in legacy:
                found.append(f"{legacy[minor]}_{self.machine}")
        return found

    def tags(self) -> set[Tag]:
        interpreter = f"cp{self.python[0]}{self.python[1]}"
        return {*cpython_tags(self.python, platforms=self.platforms()),
                *compatible_tags(self.python, interpreter=interpreter, platforms=self.platforms())}

    def markers(self) -> dict[str, str]:
        version = f"{self.python[0]}.{self.python[1]}"
        return {"python_version": version, "python_full_version": f"{version}.0", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": self.machine, "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}

    def describe(self) -> str:
        return f"Python {self.python[0]}.{self.python[1]} on {self.machine}, glibc {self.glibc[0]}.{self.glibc[1]}"


def overlay_folder(container: Container) -> Path | None:
    """Where the overlay of this image and fleetgen version lives; None when nothing is to be added."""
    if not container.image or not container.overlay:
        return None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", container.image).strip("_")
    return Path(container.overlay).expanduser().absolute() / f"{name}-fleetgen-{metadata.version('fleetgen')}"


def prepare_overlay(container: Container, probe: dict | None) -> Path | None:
    """The overlay folder, built unless an identical one is cached; None when the image has this fleetgen.

    probe: what container_probe reported from inside the image, or None where the image cannot be run here.
    """
    folder = overlay_folder(container)
    if folder is None:
        return None
    if probe and probe["distributions"].get("fleetgen") == metadata.version("fleetgen"):
        return None
    target = Target.from_probe(probe) if probe else Target.assumed(container.python_version)
    copied, fetched = needed_distributions(target, probe["distributions"] if probe else None)
    manifest = {"image": container.image, "target": target.describe(), "fleetgen": fleetgen_digest(),
                "copied": sorted(f"{d.metadata['Name']}=={d.version}" for d in copied), "fetched": sorted(fetched)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f"{folder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two launchers at once: the second waits, then reuses
        if _read_manifest(folder) == manifest:
            print(f"container: reusing the overlay {folder}", file=sys.stderr)
            return folder
        _build(folder, manifest, copied, fetched, target, container)
    return folder


def _build(folder: Path, manifest: dict, copied: list, fetched: list[str], target: Target,
           container: Container) -> None:
    started = time.monotonic()
    building = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        _copy_fleetgen(building)
        for dist in copied:
            _copy_distribution(dist, building)
        if fetched:
            _pip_install(fetched, target, container, building)
        _write_json(building / MANIFEST, manifest)
        _replace(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"container: built the overlay {folder} for {container.image} ({target.describe()}: fleetgen, "
          f"{len(copied)} distributions copied, {len(fetched)} installed by pip) in "
          f"{time.monotonic() - started:.1f} s", file=sys.stderr)


def needed_distributions(target: Target, image_has: dict[str, str] | None) -> tuple[list, list[str]]:
    """fleetgen's dependencies the image lacks: (the launcher's distributions that fit, requirements for pip).

    image_has: the image's distributions by name and version; None when unknown (then all but the packages
    every torch image has are added).
    """
    skip = IMAGE_OWN | (ASSUMED_IN_TORCH_IMAGES if image_has is None else set())
    queue = [Requirement(text) for text in metadata.requires("fleetgen") or []]
    seen: set[str] = set()
    copied, fetched = [], []
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in seen or name in skip or (req.marker and not req.marker.evaluate(target.markers())):
            continue
        seen.add(name)
        if image_has and name in image_has and req.specifier.contains(image_has[name], prereleases=True):
            continue  # the image's own version satisfies fleetgen
        dist = _installed(name)
        if dist is None or not req.specifier.contains(dist.version, prereleases=True):
            fetched.append(f"{req.name}{req.specifier}")
            continue
        if _fits(dist, target):
            copied.append(dist)
        else:
            fetched.append(f"{req.name}=={dist.version}")  # the version the launcher runs, built for the image
        queue.extend(Requirement(text) for text in dist.requires or [])
    return copied, fetched


def _installed(name: str):
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _fits(dist, target: Target) -> bool:
    """Its files can be copied as they are: installed from a wheel (not editable) whose tags the image takes."""
    direct_url = dist.read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        return False
    wheel = dist.read_text("WHEEL") or ""
    tags = {tag for line in wheel.splitlines() if line.startswith("Tag:")
            for tag in parse_tag(line.split(":", 1)[1].strip())}
    return bool(tags & target.tags())


def _copy_distribution(dist, dest: Path) -> None:
    for rel in dist.files or []:
        if rel.parts[0] == ".." or "__pycache__" in rel.parts:
            continue  # console scripts and byte code: the image's python compiles its own
        source = Path(dist.locate_file(rel))
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)


def _fleetgen_files() -> list[tuple[Path, Path]]:
    """(source, path inside the overlay) of every file of the fleetgen code this launcher runs."""
    found = []
    for package in FLEETGEN_PACKAGES:
        root = Path(importlib.import_module(f"fleetgen.{package}").__path__[0]).resolve()
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                found.append((path, Path("fleetgen", package, path.relative_to(root))))
    return found


def fleetgen_digest() -> str:
    digest = hashlib.sha256()
    for source, rel in _fleetgen_files():
        digest.update(f"{rel}\0{source.stat().st_size}\0".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def _copy_fleetgen(dest: Path) -> None:
    """The launcher's own fleetgen code (editable or not), so ranks unpickle exactly what it pickled."""
    for source, rel in _fleetgen_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / rel)
    info = dest / f"fleetgen-{metadata.version('fleetgen')}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fleetgen\nVersion: {metadata.version('fleetgen')}\n")


def _pip_install(requirements: list[str], target: Target, container: Container, dest: Path) -> None:
    python = f"{target.python[0]}.{target.python[1]}"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--target", str(dest), "--python-version", python, "--implementation", "cp",
               *(arg for platform in target.platforms() for arg in ("--platform", platform))]
    if container.wheels:
        command += ["--find-links", str(Path(container.wheels).expanduser().absolute())]
    result = subprocess.run([*command, *requirements], capture_output=True, text=True)
    if result.returncode:
        source = f"container.wheels={container.wheels} or pip's index" if container.wheels else "pip's index"
        raise LaunchError(f"container.image={container.image}: could not get wheels for {target.describe()} of "
                          f"{', '.join(requirements)} from {source} (put them in a folder and set "
                          f"container.wheels=FOLDER).\npip said: {result.stderr.strip()[-2000:]}")


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _replace(built: Path, folder: Path) -> None:
    """Put the built folder in place; an older overlay moves aside first and is removed after."""
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    built.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
