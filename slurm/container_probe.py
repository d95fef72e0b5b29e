"""What a container image offers fleetgen's ranks: run by the image's own python3, standard library only.

The launcher runs this file's text inside the image (`python3 -c SOURCE`) when the runtime can start the image
on the login node (charliecloud) and reads the JSON it prints; a rank checks the same things at its start
(slurm/container_entry.py) where the image could not be probed (pyxis). Kept free of newer syntax so that an
old interpreter still gets as far as saying it is too old.
"""
import json
import platform
import re
import sys

MIN_PYTHON = (3, 10)


def describe() -> dict:
    """The interpreter, its platform, its distributions and whether torch imports."""
    from importlib import metadata

    report = {"python": "%d.%d.%d" % sys.version_info[:3], "machine": platform.machine(),
              "libc": list(platform.libc_ver()), "distributions": {}, "torch": None, "torch_error": None}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            report["distributions"][re.sub(r"[-_.]+", "-", name).lower()] = dist.version  # PEP 503 names
    try:
        import torch

        report["torch"] = torch.__version__
    except Exception as e:  # any import failure (missing, broken CUDA libraries) makes the image unusable
        report["torch_error"] = "%s: %s" % (type(e).__name__, e)
    return report


def problems(report: dict) -> list:
    """What the image lacks, in words; empty when ranks can run in it."""
    found = []
    version = tuple(int(part) for part in report["python"].split(".")[:2])
    if version < MIN_PYTHON:
        found.append("its python3 is %s; fleetgen needs Python >= %d.%d" % ((report["python"],) + MIN_PYTHON))
    if report["torch"] is None:
        found.append("torch does not import (%s)" % report["torch_error"])
    return found


if __name__ == "__main__":
    if sys.version_info < MIN_PYTHON:  # describe() itself may not run on it: report the version alone
        print(json.dumps({"python": "%d.%d.%d" % sys.version_info[:3], "machine": platform.machine(),
                          "libc": ["", ""], "distributions": {}, "torch": None, "torch_error": "not tried"}))
    else:
        print(json.dumps(describe()))
