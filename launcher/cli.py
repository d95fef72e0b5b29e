"""`launch RECIPE [KEY=VALUE ...]`: compose → validate → submit → wait healthy → run batches → tear down."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from fleetgen.launcher import batch, control, detached
from fleetgen.launcher.config import compose_recipe, parse_config, recipes
from fleetgen.launcher.batch.outputlock import OutputLock, lock_output
from fleetgen.launcher.errors import LaunchError
from fleetgen.launcher.job import job_ref, raise_on_sigterm, submit
from fleetgen.conf.schema import LaunchConfig
from fleetgen.launcher.batch.prompts import PromptRules
from fleetgen.launcher.validate import check_chat_template, fit_to_model, place_local_ranks, read_model, validate


EPILOG = """\
modes (mode=...):
  batch                 the default: batch.input through the servers into batch.output, then tear down
  serve                 serve until Ctrl-C (or the time limit)
  detach=true           batch only: submit one job that runs the whole batch by itself, and return

job commands (JOB: a job id or job folder; default: the latest job of --folder):
  launch status [JOB] [--json]          state, progress, servers, history
  launch logs [JOB] [--rank N] [-f]     the batch driver's log, or a rank's
  launch cancel [JOB]                   drain and cancel a detached job; tear down an attended one

exit codes:
  0    every item generated (batch); a job command that did what it was asked
  1    some items failed (OUTPUT.errors.jsonl), or the batch stopped early: the printed command resumes it
  2    refused or failed: config, checkpoint, input, an output another run writes, a taken port, a failed job
  130  interrupted (Ctrl-C, SIGTERM): the job was torn down; a batch prints the command that resumes it
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _hear_sigint()
    if argv and argv[0] in control.COMMANDS:  # `launch status|logs|cancel ...`: a detached job, not a recipe
        return _reporting_errors(lambda: control.main(argv))
    parser = argparse.ArgumentParser(prog="launch", description="Serve a model on Slurm or this machine and "
                                     "run a batch of prompts through it.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="a recipe name (see --list)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel.tensor=2 cluster=slurm")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config (and the Slurm "
                        "script) without submitting")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.list:
            for name, description in recipes().items():
                print(f"{name:24} {description}")
            return 0
        if not args.recipe:
            parser.error("a recipe is needed (launch --list shows them)")
        return launch(args.recipe, args.overrides, args.dry_run, resume_command(argv))
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("launch: interrupted; the job was torn down", file=sys.stderr)
        return 130


def _hear_sigint() -> None:
    """A shell starts a background command (`launch ... &`) with SIGINT ignored, and every process it starts
    inherits that: then Ctrl-C's stand-in would not stop `launch`, and submitit's local jobs, which it stops
    with SIGINT, could not be cancelled. Python's own handler is not inherited, so the job gets the default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def resume_command(argv: list[str]) -> str:
    """The command that reruns this one and resumes its batch (batch.restart=true would start it over)."""
    kept = [arg for arg in argv if arg.lstrip("+~").replace(" ", "") not in ("batch.restart=true",
                                                                            "batch.restart=True")]
    return shlex.join(["launch", *kept])


def launch(recipe: str, overrides: list[str], dry_run: bool, command: str = "") -> int:
    started = time.monotonic()
    cfg = _with_absolute_paths(parse_config(OmegaConf.to_container(compose_recipe(recipe, overrides))))
    if dry_run:
        return _print_dry_run(cfg, overrides)
    if cfg.mode != "batch":
        validate(cfg, overrides)
        return _attended(cfg, None, recipe, started)
    with lock_output(Path(cfg.batch.output)) as lock:  # first: a second run is refused at once, and before
        validate(cfg, overrides)                      # prepare(), since batch.restart=true removes files
        plan = batch.prepare(cfg, PromptRules.load(cfg))
        plan.command = command
        if cfg.detach:
            return _submit_detached(cfg, plan, lock)  # noted in the lock; the job's driver takes it for the run
        return _attended(cfg, plan, recipe, started, lock)


def _attended(cfg: LaunchConfig, plan: batch.BatchPlan | None, recipe: str, started: float,
              lock: OutputLock | None = None) -> int:
    raise_on_sigterm()
    job = submit(cfg)
    if lock is not None:
        lock.note(job_id=job.job_id)
    try:
        try:
            urls = job.wait_until_healthy()
        except KeyboardInterrupt:
            if plan is not None:
                print(f"launch: the batch did not start; to run it, run: {plan.command or 'the same command'}",
                      file=sys.stderr)
            raise
        if cfg.mode == "serve":
            print(f"serving {recipe} at {' '.join(urls)} (PUT /generate, POST /v1/completions); "
                  "Ctrl-C stops it", flush=True)
            job.wait_for_end()  # leaves only by Ctrl-C / SIGTERM, or by raising when the job ends by itself
        summary = batch.run(plan, urls, job.token)
        if not summary.complete and not summary.stop_reason.startswith("interrupted"):
            if job.control.ended():
                raise LaunchError(f"the batch stopped: {summary.stop_reason}; once fixed, `{summary.resume}` "
                                  f"resumes it\n{job.end_report()}")
            failures = job.failure_report()
            if failures:
                print(f"launch: ranks that exited: {failures}", file=sys.stderr)
    finally:
        job.shut_down()
    return batch.report(summary, time.monotonic() - started)


def _submit_detached(cfg: LaunchConfig, plan: batch.BatchPlan, lock: OutputLock) -> int:
    job_id = detached.submit(cfg, plan)
    lock.note_job(job_ref(cfg.cluster.kind, job_id))  # queued, the job holds no lock: this says it is coming
    folder = Path(cfg.job.folder) / job_id
    print(f"submitted detached job {job_id} ({cfg.cluster.kind}); job folder {folder}\n"
          f"  launch status {folder} [--json] | launch logs {folder} [--rank N] [-f] | launch cancel {folder}")
    return 0


def _reporting_errors(command) -> int:
    try:
        return command()
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `launch logs -f` is left by Ctrl-C; the job goes on
        print(file=sys.stderr)
        return 130


def _with_absolute_paths(cfg: LaunchConfig) -> LaunchConfig:
    """Ranks may start in another directory (Slurm, containers): paths are resolved against the caller's."""
    def absolute(path):
        return str(Path(path).expanduser().resolve()) if path else path

    cfg.model.checkpoint = absolute(cfg.model.checkpoint)
    cfg.model.tokenizer = absolute(cfg.model.tokenizer)
    cfg.batch.input = absolute(cfg.batch.input)
    cfg.batch.output = absolute(cfg.batch.output)
    cfg.job.folder = absolute(cfg.job.folder)
    return cfg


def _print_dry_run(cfg: LaunchConfig, overrides: list[str]) -> int:
    """The checkpoint is often only on the cluster: a dry run reports it unreadable instead of failing, and
    reports the same way local ranks this machine has no GPUs for."""
    for check in (lambda: place_local_ranks(cfg), lambda: check_chat_template(cfg),
                  lambda: fit_to_model(cfg, read_model(cfg), overrides)):
        try:
            check()
        except LaunchError as e:
            print(f"# warning: {e}")
    print(OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump())))
    if cfg.cluster.kind == "slurm":
        from fleetgen.slurm.submission import render_sbatch

        print(render_sbatch(cfg, Path(cfg.job.folder) / "%j"))
    return 0
