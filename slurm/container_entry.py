"""A rank's first step inside a container: check that the image can run it, then hand over to submitit.

submitit starts each task as `PYTHON -u -m submitit.core._submit FOLDER`; with a container, PYTHON is
`... python3 -u -m fleetgen.slurm.container_entry IMAGE`, so this module receives IMAGE followed by submitit's
own arguments. Where the launcher could not look inside the image (pyxis), a missing torch or an old Python is
reported here, naming the image, instead of as an ImportError deep inside the unpickling of the rank's function.
"""
from __future__ import annotations

import runpy
import sys

from fleetgen.slurm.container_probe import describe, problems

SUBMITIT_ARGS = ["-u", "-m", "submitit.core._submit"]


def main(argv: list[str]) -> None:
    image, rest = argv[0], argv[1:]
    if rest[:3] != SUBMITIT_ARGS or len(rest) != 4:
        sys.exit(f"fleetgen.slurm.container_entry: expected IMAGE {' '.join(SUBMITIT_ARGS)} FOLDER, got {argv}")
    missing = problems(describe())
    if missing:
        sys.exit(f"container image {image} cannot run fleetgen's ranks: {'; '.join(missing)}")
    sys.argv = [rest[2], rest[3]]
    runpy.run_module(rest[2], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
