"""Ranks inside a container: one list of mounts, mapped onto the runtime's own arguments.

Both runtimes get the same things: the image, the mounts (container.mounts, the job folder, the checkpoint and
tokenizer read-only at their login-node paths, the overlay read-only), the working directory (the job folder
unless container.workdir) and the environment (the job's, which both runtimes pass on, with the overlay first
on PYTHONPATH).
- pyxis: srun's --container-* flags; the task's interpreter is the image's python3.
- charliecloud: no srun flags; the task's interpreter is `ch-run --bind=SRC:DST ... IMAGE -- python3`, given
  to submitit as its `python` (the command its sbatch script starts each task with, meant for this use).
With an overlay, python3 first runs fleetgen.slurm.container_entry, which checks the image before submitit's
own entry point runs.
"""
from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fleetgen.conf.schema import Container, LaunchConfig
from fleetgen.launcher.errors import LaunchError
from fleetgen.slurm import container_probe
from fleetgen.slurm.container_overlay import overlay_folder, prepare_overlay

CONTAINER_PYTHON = "python3"  # the image's interpreter: the login node's path means nothing inside it
# ch-run 0.31 binds the node's /etc/resolv.conf and /etc/passwd but not /etc/hosts, where clusters (and
# slurm/local_cluster.sh) may name their nodes: ranks resolve the rendezvous host by that name.
CH_RUN_NODE_FILES = ("/etc/hosts",)
CH_RUN_SHARED = PurePosixPath("/tmp")  # ch-run binds the node's $TMPDIR (or /tmp) there: nothing mounts inside
PROBE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False

    @classmethod
    def parse(cls, index: int, text: str) -> "Mount":
        parts = text.split(":")
        if not text or "," in text or len(parts) > 3 or not all(parts[:2]):
            raise ValueError(f"container.mounts[{index}]={text!r}: expected HOST_PATH[:CONTAINER_PATH[:ro]] "
                             "without commas")
        return cls(parts[0], parts[1] if len(parts) > 1 else parts[0], parts[2:] == ["ro"])

    def covers(self, path: str) -> bool:
        """path is visible at the same place through this mount."""
        source, target, wanted = PurePosixPath(self.source), PurePosixPath(self.target), PurePosixPath(path)
        return wanted.is_relative_to(source) and target / wanted.relative_to(source) == wanted


def mount_folder(job_folder: Path | str) -> Path:
    """The job folder without its submitit placeholders (folder/%j): what exists before the job starts."""
    folder = Path(job_folder).expanduser().absolute()
    while "%" in folder.as_posix():
        folder = folder.parent
    return folder


def read_only_paths(cfg: LaunchConfig, overlay: Path | None) -> list[str]:
    """What ranks read besides the job folder, mounted read-only at the same paths as on the login node."""
    return [path for path in (cfg.model.checkpoint, cfg.model.tokenizer, overlay) if path is not None]


def mounts(container: Container, job_folder: Path | str, read_only: list) -> tuple[list[str], list[Mount]]:
    """(container.mounts as given, what fleetgen adds: the job folder, then read_only). A path that an earlier
    mount already shows at the same place is left out."""
    given = [Mount.parse(i, text) for i, text in enumerate(container.mounts)]
    added: list[Mount] = []
    for path, is_read_only in [(mount_folder(job_folder), False), *((path, True) for path in read_only)]:
        path = str(Path(path).expanduser().absolute())
        if not any(mount.covers(path) for mount in [*given, *added]):
            added.append(Mount(path, path, is_read_only))
    return list(container.mounts), added


def container_srun_args(container: Container, job_folder: Path | str, read_only: list = ()) -> list[str]:
    """pyxis/enroot flags for srun; [] without an image or with another runtime. The job folder is always
    mounted, so ranks write the server address, rendezvous file and results where the launcher reads them."""
    if not container.image or container.runtime != "pyxis":
        return []
    given, added = mounts(container, job_folder, list(read_only))
    flags = [*given, *(f"{m.source}:{m.target}" + (":ro" if m.read_only else "") for m in added)]
    args = [f"--container-image={container.image}", f"--container-mounts={','.join(flags)}",
            f"--container-workdir={container.workdir or mount_folder(job_folder)}"]
    if not container.mount_home:
        args.append("--no-container-mount-home")
    return args


def container_python(cfg: LaunchConfig, job_folder: Path | str, overlay: Path | None) -> str | None:
    """The command that starts a task's interpreter inside the image (submitit's `python`); None without one."""
    container = cfg.container
    if cfg.cluster.kind != "slurm" or not container.image:
        return None
    entry = [CONTAINER_PYTHON] if overlay is None else \
        [CONTAINER_PYTHON, "-u", "-m", "fleetgen.slurm.container_entry", container.image]
    if container.runtime == "pyxis":
        # The overlay's PYTHONPATH is set on the command: pyxis lets an image's own value win over the job's.
        prefix = [] if overlay is None else ["env", f"PYTHONPATH={overlay}"]
        return shlex.join([*prefix, *entry])
    return shlex.join([*ch_run_args(cfg, job_folder, overlay), "--", *entry])


def ch_run_args(cfg: LaunchConfig, job_folder: Path | str, overlay: Path | None) -> list[str]:
    container = cfg.container
    args = ["ch-run"]
    for mount in charliecloud_mounts(cfg, job_folder, overlay):
        args.append(f"--bind={mount.source}:{mount.target}")  # ch-run 0.31 has no read-only binds
    args.append(f"--cd={container.workdir or mount_folder(job_folder)}")
    if container.mount_home:
        args.append("--home")
    # ch-run passes the job's environment on: the login node's PYTHONPATH names nothing inside the image.
    args.append(f"--set-env=PYTHONPATH={overlay}" if overlay else "--unset-env=PYTHONPATH")
    return [*args, container.image]


def charliecloud_mounts(cfg: LaunchConfig, job_folder: Path | str, overlay: Path | None) -> list[Mount]:
    given, added = mounts(cfg.container, job_folder, read_only_paths(cfg, overlay))
    found = [*(Mount(path, path) for path in CH_RUN_NODE_FILES),
             *(Mount.parse(i, text) for i, text in enumerate(given)), *added]
    for mount in found:
        if PurePosixPath(mount.target).is_relative_to(CH_RUN_SHARED):
            raise LaunchError(f"container.runtime=charliecloud: {mount.source} cannot be mounted at {mount.target}, "
                              f"because ch-run shares the node's own {CH_RUN_SHARED} there; move it out of "
                              f"{CH_RUN_SHARED} (job.folder, model.checkpoint, container.overlay or "
                              "container.mounts)")
    return found


def prepare_container(cfg: LaunchConfig, job_folder: Path | str) -> Path | None:
    """At submission: look into the image where the runtime can (charliecloud), build or reuse the overlay, and
    make the mount points ch-run needs. Returns the overlay folder, or None when nothing is added."""
    container = cfg.container
    if cfg.cluster.kind != "slurm" or not container.image:
        return None
    if container.runtime == "pyxis":
        return prepare_overlay(container, None)  # pyxis images cannot be started on the login node
    probe = probe_image(container)
    overlay = prepare_overlay(container, probe)
    make_mount_points(container.image, charliecloud_mounts(cfg, job_folder, overlay))
    return overlay


def probe_image(container: Container) -> dict:
    """container_probe's report from inside a charliecloud image; an unusable image fails here, named."""
    image = Path(container.image)
    if not (image / "usr").is_dir():
        raise LaunchError(f"container.image={container.image}: not a charliecloud image directory "
                          "(no /usr in it)")
    source = Path(container_probe.__file__).read_text()
    command = ["ch-run", "--unset-env=PYTHONPATH", str(image), "--", CONTAINER_PYTHON, "-c", source]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except FileNotFoundError:
        raise LaunchError("container.runtime=charliecloud but ch-run is not installed on this machine "
                          "(Debian: apt-get install charliecloud-runtime)") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"container.image={container.image}: its {CONTAINER_PYTHON} did not report on the image "
                          f"within {PROBE_TIMEOUT_S} s") from None
    if result.returncode:
        raise LaunchError(f"container.image={container.image} cannot run fleetgen's ranks: its {CONTAINER_PYTHON} "
                          f"did not start ({result.stderr.strip()[-500:]})")
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise LaunchError(f"container.image={container.image}: its {CONTAINER_PYTHON} did not report on the "
                          f"image (stdout: {result.stdout.strip()[-500:]!r})") from None
    missing = container_probe.problems(report)
    if missing:
        raise LaunchError(f"container.image={container.image} cannot run fleetgen's ranks: {'; '.join(missing)}")
    return report


def make_mount_points(image: str, binds: list[Mount]) -> None:
    """ch-run binds only onto paths that exist in the image: make them, as empty folders or files."""
    for mount in binds:
        point = Path(image) / mount.target.lstrip("/")
        try:
            if Path(mount.source).is_file():
                point.parent.mkdir(parents=True, exist_ok=True)
                point.touch(exist_ok=True)
            else:
                point.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LaunchError(f"container.image={image}: cannot make the mount point {mount.target} in the image "
                              f"({e}); make it there, or mount elsewhere") from None


def planned_overlay(cfg: LaunchConfig) -> Path | None:
    """The overlay a submission would use, without building it (for the dry run)."""
    if cfg.cluster.kind != "slurm":
        return None
    return overlay_folder(cfg.container)
