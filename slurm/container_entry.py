"""A rank's first step inside a container: check that the image can run it, then hand over to submitit.

submitit starts each task as `PYTHON -u -m submitit.core._submit FOLDER`; with a container, PYTHON is
`... python3 -u -m fleetgen.slurm.container_entry IMAGE`, so this module receives IMAGE followed by submitit's
own arguments. Where the launcher could not look inside the image (pyxis), a missing torch or an old Python is
reported here, naming the image, instead of as an ImportError deep inside the unpickling of the rank's function.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

from fleetgen.slurm.container_probe import describe, problems

SUBMITIT_ARGS = ["-u", "-m", "submitit.core._submit"]


def main(argv: list[str]) -> None:
    if len(argv) != 5 or argv[1:4] != SUBMITIT_ARGS:
        sys.exit(f"fleetgen.slurm.container_entry: expected IMAGE {' '.join(SUBMITIT_ARGS)} FOLDER, got {argv}")
    image, module, folder = argv[0], argv[3], argv[4]
    report = describe()
    missing = problems(report)
    if missing:
        sys.exit(f"container image {image} cannot run fleetgen's ranks: {'; '.join(missing)}")
    print(f"in container image {image}: {sys.executable} (Python {report['python']}), torch {report['torch']}, "
          f"fleetgen from {Path(__file__).resolve().parents[1]}", flush=True)
    sys.argv = [module, folder]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
