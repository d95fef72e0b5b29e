"""`launch` as a user at a terminal meets it: any checkpoint under the tiny recipe, and Ctrl-C of a server."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.distributed import our_processes
from tests.server_fixtures import build_tiny_checkpoint

pytestmark = pytest.mark.slow


def test_tiny_runs_a_checkpoint_with_fewer_positions_than_the_recipes_max_seq_len(tmp_path):
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt")  # 128 positions; the tiny recipe says 512
    # prompts that fit its context with the recipe's 32 new tokens (its tokenizer knows little English)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(x):", "Café")))
    result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", f"model.checkpoint={checkpoint}",
                             "batch.input=in.jsonl", "job.folder=jobs"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and not [r for r in records if "error" in r]
    logs = "".join(p.read_text() for p in (tmp_path / "jobs").glob("*/*_log.out"))
    assert "slots of up to 128 tokens" in logs  # the KV cache holds the checkpoint's context, not the recipe's 512


def test_ctrl_c_of_a_serving_launcher_shows_one_line_and_exits_130(tmp_path):
    """The terminal sends SIGINT to its whole foreground process group: the launcher and everything it started
    there. A process group of its own stands in for the terminal's."""
    proc = subprocess.Popen([sys.executable, "-m", "fleetgen.launcher", "tiny", "mode=serve", "job.folder=jobs"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny at http://127.0.0.1:"), line or proc.stderr.read()
        before = len(list((tmp_path / "jobs").glob("*/*_log.err")))
        assert before == 1  # one rank, started and serving
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    lines = err.splitlines()
    serving = next(i for i, text in enumerate(lines) if text.startswith("job ") and text.endswith(": running"))
    assert lines[serving + 1:] == ["launch: interrupted; the job was torn down"], err
    assert "Traceback" not in err and out == ""
    assert our_processes(str(tmp_path)) == []


def test_a_launcher_started_with_sigint_ignored_still_stops_on_it_and_cancels_its_job(tmp_path):
    """`launch ... &` from a script: the shell ignores SIGINT for it, and its processes would inherit that."""
    proc = subprocess.Popen([sys.executable, "-m", "fleetgen.launcher", "tiny", "mode=serve", "job.folder=jobs"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny at http://127.0.0.1:"), line or proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "launch: interrupted; the job was torn down" in err
    assert our_processes(str(tmp_path)) == []
