"""Submitting and watching detached jobs from a test, as a user in another shell would: through `launch`."""
import json
import subprocess
import sys
import time

import psutil

LAUNCH = [sys.executable, "-m", "fleetgen.launcher"]
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")


# Items long enough (a tiny model's 256 tokens) that a batch cannot end between the test's look at its progress
# and the signal it sends next: a test that kills mid-run needs a run to be in the middle of.
LONG_ITEMS = "generation.tokens_to_generate=256"


def write_prompts(path, count, prefix="Chapter"):
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{prefix} {i}. It was a"}) + "\n"
                            for i in range(count)))
    return path


def submit(tmp_path, recipe, *overrides):
    """`launch RECIPE detach=true ...`; returns the job id once the launcher has exited."""
    result = subprocess.run([*LAUNCH, recipe, "detach=true", "job.folder=jobs", *overrides], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job_id = (tmp_path / "jobs" / "latest").read_text().strip()
    assert f"submitted detached job {job_id}" in result.stdout
    return job_id


def launch(tmp_path, *args, timeout=240):
    return subprocess.run([*LAUNCH, *args, "--folder", "jobs"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


def status(tmp_path, job_id):
    result = launch(tmp_path, "status", job_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def final_status(tmp_path, job_id):
    """`launch status` once Slurm has recorded the job's end (sacct lags the queue by a moment)."""
    return wait_until(lambda: (lambda report: report if report["state"] not in ACTIVE else None)(
        status(tmp_path, job_id)), 60, f"job {job_id}'s final state")


def squeue(job_id):
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True,
                          text=True).stdout.strip()


def wait_until(condition, timeout, what, every=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_slurm_end(job_id, timeout=300):
    """Until the job leaves the queue. Slurm holds a requeued job for two minutes (BeginTime): release it."""
    def ended():
        queued = squeue(job_id)
        if "BeginTime" in queued:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        return not queued
    wait_until(ended, timeout, f"job {job_id} to leave the queue")


def progress(tmp_path, output="results.jsonl"):
    try:
        return json.loads((tmp_path / f"{output}.progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_for_progress(tmp_path, done, timeout=180):
    return wait_until(lambda: progress(tmp_path).get("done", 0) >= done, timeout, f"{done} items done", every=0.2)


def output_ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def assert_every_item_once(tmp_path, count, output="results.jsonl"):
    ids = output_ids(tmp_path / output)
    assert sorted(ids) == sorted(f"r{i}" for i in range(count)), (len(ids), len(set(ids)))


def sacct_state(job_id):
    return wait_until(lambda: _final_state(job_id), 60, f"sacct's final state of job {job_id}")


def _final_state(job_id):
    lines = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                           text=True).stdout.split("\n")
    state = lines[0].strip() if lines else ""
    return state if state and state not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING") else None


def rank_process(job_id, rank):
    """The model process of a job's global rank (a child of its Slurm task)."""
    for proc in psutil.process_iter(["cmdline"]):
        if "fleetgen.launcher.detached" not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank):
            return proc
    raise AssertionError(f"no process of rank {rank} in job {job_id}")


def processes_of(marker):
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def kill_all(processes):
    for proc in processes:
        try:
            proc.resume()
            proc.kill()
        except psutil.NoSuchProcess:
            pass
