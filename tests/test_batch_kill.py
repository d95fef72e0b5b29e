"""Batches killed with SIGKILL at random moments, over and over, then rerun until they finish: every
(key, sample) exactly once, in input order, equal to an uninterrupted run's greedy text.

The 21 kills in a row hit a batch driver process (prepare + run, what `launch` and a Slurm-side driver call)
against the tiny model served in this process, so each costs a second rather than a job's start-up; then
the real `launch tiny` is killed mid-batch three times (once leaving a torn ledger line) and rerun."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fleetgen.launcher.config import DATA_DIR
from tests.batch_stub import read_jsonl, write_jsonl
from tests.server_fixtures import serving

ITEMS = 300
DRIVER_KILLS = 21
MAX_STEP = 12  # ledger entries one killed driver may add: 21 kills stay within the batch
LAUNCH_KILLS = 3
TOKENS = "generation.tokens_to_generate=6"
# The driver imports tests.batch_stub: it runs in a batch folder, so the repository goes on its path.
DRIVER_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
DRIVER = textwrap.dedent("""
    import sys
    from fleetgen.launcher.batch import prepare, run
    from tests.batch_stub import batch_config
    cfg = batch_config("in.jsonl", "out.jsonl", generation={"tokens_to_generate": 6}, concurrency=4)
    summary = run(prepare(cfg), [sys.argv[1]], None)
    sys.exit(0 if summary.complete else 3)
""")


def batch_input(path, n=ITEMS):
    rows = [{"id": f"rec-{i}", "prompt": f"Chapter {i}. It was"} for i in range(n)]
    if n == ITEMS:
        rows[100] = {"id": "rec-100", "prompt": "word " * 600}                    # longer than the context
        rows[200] = {"id": "rec-200", "prompt": "Emma", "tokens_to_generate": 100000}  # more than the context holds
    return write_jsonl(path, rows)


def entries(ledger) -> int:
    return max(0, len(ledger.read_bytes().splitlines()) - 1) if ledger.exists() else 0


def kill_at_random(start, ledger, rng, wait_for_progress: bool) -> int | None:
    """Start a run; SIGKILL it at a random moment: after it added a random few entries to the ledger, or (not
    wait_for_progress) after a random time, often before its first entry. At most MAX_STEP entries a run, so
    that however fast the machine, the batch outlasts the kills. The ledger's entries then, or None if the
    run finished first."""
    before = entries(ledger)
    target = before + (rng.randint(1, MAX_STEP) if wait_for_progress else MAX_STEP)
    deadline = time.monotonic() + (60 if wait_for_progress else rng.uniform(0.1, 1.5))
    proc = start()
    while proc.poll() is None and entries(ledger) < target and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return entries(ledger)


def cut_last_line_in_half(ledger) -> None:
    data = ledger.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    ledger.write_bytes(data[:last_start + (len(data) - last_start) // 2])


def assert_exactly_once_and_equal(folder, reference) -> None:
    out, errors = read_jsonl(folder / "out.jsonl"), read_jsonl(folder / "out.jsonl.errors.jsonl")
    assert out == read_jsonl(reference / "out.jsonl")
    # refused by the server (a driver alone), or by the validation pass (launch, batch.long_prompts=skip)
    assert [(e["id"], "context window" in e["error"]) for e in errors] == \
        [(e["id"], True) for e in read_jsonl(reference / "out.jsonl.errors.jsonl")]
    keys = [(r["id"], r["sample"]) for r in out + errors]
    assert len(keys) == len(set(keys)) == ITEMS
    summary = json.loads((folder / "out.jsonl.summary.json").read_text())
    assert summary["audit"] == {"input_items": ITEMS, "output_records": ITEMS - 2, "error_records": 2,
                                "repeated_keys": 0, "ledger_repeats": 0, "ok": True}


def leftover_processes(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


@pytest.fixture(scope="module")
def tiny_server():
    """The recipe's tiny model with the recipe's KV cache, served in this process."""
    with serving(DATA_DIR / "tiny-gpt2", max_batch=8, max_seq_len=512) as served:
        yield served


@pytest.fixture(scope="module")
def reference(tiny_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    batch_input(folder / "in.jsonl")
    driver = subprocess.run([sys.executable, "-c", DRIVER, tiny_server.url], env=DRIVER_ENV, cwd=folder,
                            capture_output=True,
                            text=True, timeout=120)
    assert driver.returncode == 0, driver.stderr
    return folder


@pytest.mark.slow
def test_a_driver_sigkilled_21_times_in_a_row_loses_and_repeats_nothing(tiny_server, reference, tmp_path):
    batch_input(tmp_path / "in.jsonl")
    ledger, rng, seen = tmp_path / "out.jsonl.ledger.jsonl", random.Random(9), []

    def start():
        return subprocess.Popen([sys.executable, "-c", DRIVER, tiny_server.url], env=DRIVER_ENV, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    for kill in range(DRIVER_KILLS):
        seen.append(kill_at_random(start, ledger, rng, wait_for_progress=kill % 3 != 0))
        assert seen[-1] is not None, f"the batch finished after {kill} kills: {seen}"
        if kill == DRIVER_KILLS // 2:
            cut_last_line_in_half(ledger)
    assert seen[-1] < ITEMS and len(set(seen)) > DRIVER_KILLS // 2, seen  # kills fell all through the batch
    final = subprocess.run([sys.executable, "-c", DRIVER, tiny_server.url], env=DRIVER_ENV, cwd=tmp_path,
                           capture_output=True,
                           text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert_exactly_once_and_equal(tmp_path, reference)


def launch(cwd, *overrides, **popen):
    command = [sys.executable, "-m", "fleetgen.launcher", "tiny", "job.folder=jobs", "batch.input=in.jsonl",
               "batch.output=out.jsonl", TOKENS, "batch.concurrency=4",
               "batch.long_prompts=skip", *overrides]  # the two over-long records go to the errors file
    if popen:
        return subprocess.Popen(command, cwd=cwd, **popen)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_launch_tiny_sigkilled_mid_batch_resumes_and_exits_1_for_refused_records(reference, tmp_path):
    batch_input(tmp_path / "in.jsonl")
    ledger, rng, seen = tmp_path / "out.jsonl.ledger.jsonl", random.Random(4), []
    for kill in range(LAUNCH_KILLS):
        seen.append(kill_at_random(lambda: launch(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                                   ledger, rng, wait_for_progress=True))
        assert seen[-1] is not None, seen
        if kill == 1:
            cut_last_line_in_half(ledger)
    final = launch(tmp_path)
    assert final.returncode == 1, final.stderr  # the two refused records
    assert "298 done, 2 failed" in final.stdout and "launch: failed: key 'rec-100'" in final.stderr
    assert "left running by a launcher that crashed" in final.stderr  # the killed launcher's job was reaped
    assert_exactly_once_and_equal(tmp_path, reference)
    assert leftover_processes(str(tmp_path)) == []

    # the input changes: refused before anything is submitted; batch.restart=true starts over
    batch_input(tmp_path / "in.jsonl", n=20)
    changed = launch(tmp_path)
    assert changed.returncode == 2 and "written for a different input" in changed.stderr
    assert "batch.restart=true" in changed.stderr
    restarted = launch(tmp_path, "batch.restart=true")
    assert restarted.returncode == 0, restarted.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"rec-{i}" for i in range(20)]
    assert leftover_processes(str(tmp_path)) == []
