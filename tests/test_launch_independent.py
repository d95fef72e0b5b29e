"""Launches from one folder never harm each other; a batch stopped by Ctrl-C says so and how to resume it."""
import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
import requests

from fleetgen.launcher.config import DATA_DIR
from tests.distributed import our_processes

pytestmark = pytest.mark.slow
LAUNCH = [sys.executable, "-m", "fleetgen.launcher"]


def serve(tmp_path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*LAUNCH, "tiny", "mode=serve", "job.folder=jobs"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    line = proc.stdout.readline()
    assert line.startswith("serving tiny at "), line or proc.stderr.read()
    return proc, line.split()[3]


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return out, err


def wait_for(path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.stat().st_size):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_two_serves_and_a_batch_from_one_folder_all_finish(tmp_path):
    first, first_url = serve(tmp_path)
    second, second_url = None, None
    try:
        second, second_url = serve(tmp_path)
        batch = subprocess.run([*LAUNCH, "tiny", "job.folder=jobs"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=600)
        assert batch.returncode == 0, batch.stderr
        assert "Traceback" not in batch.stderr and "is gone" not in batch.stderr
        for url in (first_url, second_url):  # neither server was reaped by a later launch
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        errors = [stop(proc)[1] for proc in (first, second) if proc is not None]
    assert all("launch: interrupted; the job was torn down" in err for err in errors)
    assert our_processes(str(tmp_path)) == []


def test_a_second_batch_on_the_same_output_is_refused_at_once_and_the_first_finishes(tmp_path):
    first = subprocess.Popen([*LAUNCH, "tiny", "job.folder=jobs"], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(tmp_path / "results.jsonl.lock")
        started = time.monotonic()
        second = subprocess.run([*LAUNCH, "tiny", "job.folder=jobs"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        assert time.monotonic() - started < 5
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    assert "is being written by another run" in second.stderr and f"pid {first.pid} on " in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, err
    summary = json.loads((tmp_path / "results.jsonl.summary.json").read_text())
    assert summary["complete"] and summary["audit"]["ok"]
    assert our_processes(str(tmp_path)) == []


def test_a_batch_stopped_by_ctrl_c_writes_its_summary_and_prints_the_command_that_resumes_it(tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"Once upon a time {i}"}) + "\n"
                                               for i in range(1000)))
    command = ["tiny", "batch.input=in.jsonl", "job.folder=jobs", "batch.concurrency=1",
               "batch.prompts_per_request=1"]
    proc = subprocess.Popen([*LAUNCH, *command], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        ledger = tmp_path / "results.jsonl.ledger.jsonl"
        deadline = time.monotonic() + 300
        while not (ledger.exists() and len(ledger.read_bytes().splitlines()) > 2):  # the header, then items
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        out, err = stop(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    summary = json.loads((tmp_path / "results.jsonl.summary.json").read_text())
    assert not summary["complete"] and summary["stop_reason"] == "interrupted by Ctrl-C", summary
    assert 0 < summary["done"] < 1000
    resume = "launch " + " ".join(command)
    assert summary["resume"] == resume
    assert f"launch: to resume it, run: {resume}" in err, err
    assert "Traceback" not in err
    assert our_processes(str(tmp_path)) == []


def test_progress_on_a_terminal_of_no_columns_is_the_plain_line(tmp_path):
    """Some terminals (a CI's pty, an emulator's pane) say they have 0 columns: no bar fits there."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))  # rows, columns, pixels
    proc = subprocess.Popen([*LAUNCH, "tiny", "job.folder=jobs"], cwd=tmp_path, stdout=terminal,
                            stderr=subprocess.PIPE, text=True)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err
    text = shown.decode()
    records = sum(1 for line in (DATA_DIR / "tiny_prompts.jsonl").read_text().splitlines() if line.strip())
    assert f"batch: 0/{records} items (0%)" in text, text
    assert "\r" not in text.replace("\r\n", "\n") and "\x1b[" not in text, text


def test_status_logs_and_cancel_work_on_a_job_a_launcher_attends(tmp_path):
    proc, url = serve(tmp_path)
    try:
        def command(*args, **options):
            return subprocess.run([*LAUNCH, *args, "--folder", "jobs"], cwd=tmp_path, capture_output=True,
                                  text=True, **options)

        shown = command("status", timeout=60)  # no job named: the latest
        assert shown.returncode == 0 and f"serving at {url}" in shown.stdout and ", serve, attended by" in shown.stdout
        assert f"attended by launch pid {proc.pid} on " in shown.stdout and "output:" not in shown.stdout
        follow = subprocess.Popen([*LAUNCH, "logs", "-f", "--folder", "jobs"], cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(3)
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=30)
        assert follow.returncode == 130 and "Traceback" not in err and "serving on port" in out, err
        cancelled = command("cancel", timeout=180)
        assert cancelled.returncode == 0 and "tore it down; state ENDED" in cancelled.stdout, cancelled.stderr
        assert proc.wait(timeout=60) == 130
        assert "ETA" not in command("status", timeout=60).stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert our_processes(str(tmp_path)) == []
