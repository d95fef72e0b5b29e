"""Container images for the charliecloud tests, built here from Debian's packages, once per CI run.

Two directory images under .ci-cache/container-images (ignored by git; reused while they exist):
- python: Debian 12 'bookworm' minbase with python3 and pip, from debootstrap; no torch.
- torch: the same plus the CPU torch, installed by the image's own pip. Never fleetgen: the launcher adds it.
Installs charliecloud's ch-run and debootstrap first when they are missing (Debian's packages; needs root).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".ci-cache" / "container-images"
MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ["python3", "python3-pip"]
DEBIAN_PYTHON = "3.11"  # bookworm's python3
TORCH = "torch==2.13.0"  # the CPU build, as in the README's set-up command
TOOLS = {"ch-run": "charliecloud-runtime", "debootstrap": "debootstrap"}


def run(command: list[str], **kwargs) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def install_tools() -> None:
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def images() -> dict[str, Path]:
    """{"python": image without torch, "torch": image with the CPU torch}, built unless cached."""
    install_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    # Named by what they are built from: a changed recipe builds new images instead of reusing stale ones.
    recipe = hashlib.sha256(repr((MIRROR, DEBIAN_PACKAGES, DEBIAN_PYTHON, TORCH)).encode()).hexdigest()[:12]
    found = {"python": CACHE / f"python-{recipe}", "torch": CACHE / f"torch-{recipe}"}
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find the images
        _build(found["python"], _debootstrap)
        _build(found["torch"], lambda path: _add_torch(found["python"], path))
    return found


def _build(image: Path, make) -> None:
    """make(path) builds the image in a scratch folder; it becomes `image` only once complete."""
    if image.exists():
        return
    scratch = image.with_name(f"{image.name}.building")
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.monotonic()
    make(scratch)
    scratch.rename(image)
    print(f"container image {image} built in {time.monotonic() - started:.0f} s", file=sys.stderr)


def _debootstrap(path: Path) -> None:
    run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}", "bookworm", str(path),
         MIRROR])


def _add_torch(python_image: Path, path: Path) -> None:
    """The launcher's pip fetches the wheels (its configured index: this machine's CPU torch), the image's pip
    installs them, offline."""
    wheels = CACHE / "wheels"
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version",
         DEBIAN_PYTHON, "--dest", str(wheels), TORCH])
    run(["cp", "-a", str(python_image), str(path)])
    run(["ch-run", "--write", "--unset-env=PIP_*", f"--bind={wheels}:/mnt/wheels", str(path), "--", "python3",
         "-m", "pip", "install", "--quiet", "--no-index", "--find-links", "/mnt/wheels", "--break-system-packages",
         "--no-cache-dir", TORCH], env={**os.environ, "USER": os.environ.get("USER", "root")})
