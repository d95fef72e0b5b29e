"""The GPUs this machine shows the launcher, found without torch: the launcher needs no model code, and
importing torch would cost it seconds and hundreds of MB before every submission.

Each source is a parameter, so tests fake them: the environment, the nvidia-smi runner, the /proc folder.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

NVIDIA_SMI_TIMEOUT_S = 10  # a wedged driver can hang nvidia-smi; then the next source is asked
PROC_GPUS = Path("/proc/driver/nvidia/gpus")  # the driver's folder: one entry (a PCI address) per GPU
_GPU_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)  # `nvidia-smi -L`: "GPU 0: NVIDIA H200 (UUID: GPU-...)"


@dataclass(frozen=True)
class MachineGpus:
    names: tuple[str, ...]  # as CUDA_VISIBLE_DEVICES takes them: indices or UUIDs
    source: str             # where they were found, for messages: "CUDA_VISIBLE_DEVICES=2,3", "nvidia-smi -L"

    def __str__(self) -> str:
        count = len(self.names)
        return f"{count or 'no'} GPU{'' if count == 1 else 's'} ({self.source})"


def run_nvidia_smi(args: list[str], timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> str | None:
    """nvidia-smi's output; None when it is not installed, fails (no driver loaded) or hangs."""
    command = shutil.which("nvidia-smi")
    if command is None:
        return None
    try:
        result = subprocess.run([command, *args], capture_output=True, text=True, timeout=timeout_s)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return result.stdout if result.returncode == 0 else None


def machine_gpus(env: Mapping[str, str] = os.environ,
                 nvidia_smi: Callable[[list[str]], str | None] = run_nvidia_smi,
                 proc: Path = PROC_GPUS) -> MachineGpus:
    """CUDA_VISIBLE_DEVICES when set (it is what CUDA would show the ranks), else `nvidia-smi -L`, else the
    driver's /proc folder, else none."""
    if "CUDA_VISIBLE_DEVICES" in env:
        value = env["CUDA_VISIBLE_DEVICES"]
        return MachineGpus(cuda_visible_devices(value),
                           f"CUDA_VISIBLE_DEVICES={value}" if value.strip() else "CUDA_VISIBLE_DEVICES is empty")
    listing = nvidia_smi(["-L"])
    if listing is not None and _GPU_LINE.search(listing):
        return MachineGpus(tuple(_GPU_LINE.findall(listing)), "nvidia-smi -L")
    entries = sorted(proc.iterdir()) if proc.is_dir() else []
    if entries:
        return MachineGpus(tuple(str(i) for i in range(len(entries))), str(proc))
    return MachineGpus((), f"CUDA_VISIBLE_DEVICES unset, no GPU from nvidia-smi -L, none in {proc}")


def cuda_visible_devices(value: str) -> tuple[str, ...]:
    """The devices CUDA takes from CUDA_VISIBLE_DEVICES: the entries before the first empty or negative one
    (so "" and "-1" hide every GPU, and "0,-1,1" shows only GPU 0)."""
    names = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        names.append(entry)
    return tuple(names)
