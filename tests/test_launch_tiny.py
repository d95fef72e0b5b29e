"""`launch tiny` end to end, as the README's first command runs it."""
import json
import subprocess
import sys

import requests
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.decoders import ByteLevel as ByteLevelDecoder
from tokenizers.pre_tokenizers import ByteLevel
from transformers import GPT2LMHeadModel

from fleetgen.launcher.config import DATA_DIR
from tests.distributed import our_processes

TINY = DATA_DIR / "tiny-gpt2"
PROMPTS = DATA_DIR / "tiny_prompts.jsonl"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("launch-tiny")
    result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", "job.folder=jobs"],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    return workdir, result


@pytest.mark.slow
def test_launch_tiny_writes_one_record_per_prompt(tiny_run):
    workdir, result = tiny_run
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    assert [r["id"] for r in records] == [p.get("id") for p in prompts]
    for record, prompt in zip(records, prompts):
        assert record["prompt"] == prompt["prompt"]
        assert isinstance(record["completion"], str)
        assert record["prompt_tokens"] > 0 and 0 < record["completion_tokens"]
        assert record["completion_tokens"] <= record["params"]["tokens_to_generate"]
        assert record["params"]["greedy"] is True
    assert "results:" in result.stdout and "tokens/s" in result.stdout and "wall time" in result.stdout
    assert not (workdir / "results.jsonl.partial").exists()


@pytest.mark.slow
def test_no_process_of_the_job_outlives_the_launcher(tiny_run):
    workdir, result = tiny_run
    assert result.returncode == 0, result.stderr
    assert our_processes(str(workdir)) == []
    assert all(json.loads(p.read_text())["ended"] for p in (workdir / "jobs").glob("*/job.json"))


@pytest.mark.slow
def test_greedy_completions_equal_transformers_generate(tiny_run):
    workdir, result = tiny_run
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer(BPE.from_file(str(TINY / "vocab.json"), str(TINY / "merges.txt")))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tokenizer.decoder = ByteLevelDecoder()
    reference = GPT2LMHeadModel.from_pretrained(TINY).eval()
    for line in (workdir / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        ids = tokenizer.encode(record["prompt"]).ids
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=record["params"]["tokens_to_generate"],
                                     do_sample=False, eos_token_id=reference.config.eos_token_id,
                                     pad_token_id=reference.config.eos_token_id)
        new = out[0, len(ids):].tolist()
        if reference.config.eos_token_id in new:  # the server stops at the end string and drops nothing
            new = new[:new.index(reference.config.eos_token_id) + 1]
        assert record["completion_tokens"] == len(new), record
        assert record["completion"] == tokenizer.decode(new, skip_special_tokens=False), record


@pytest.mark.slow
def test_serve_mode_then_a_crashed_launcher_is_cleaned_up_by_the_next_run(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fleetgen.launcher", "tiny", "mode=serve", "job.folder=jobs"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving tiny at http://127.0.0.1:"), proc.stderr.read() if not line else line
    url = line.split()[3]
    assert requests.put(f"{url}/generate", json={"sentences": ["Once upon"], "tokens_to_generate": 4,
                                                 "greedy": True}).status_code == 200
    proc.kill()  # SIGKILL: no teardown ran, the job keeps serving
    proc.wait()
    assert requests.get(f"{url}/health").status_code == 200
    result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", "job.folder=jobs",
                             "batch.output=again.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "left running by a launcher that crashed" in result.stderr
    assert our_processes(str(tmp_path)) == []


@pytest.mark.slow
def test_tensor2_pipeline2_on_the_local_executor_gives_the_same_completions(tiny_run, tmp_path):
    workdir, result = tiny_run
    assert result.returncode == 0, result.stderr
    split = subprocess.run([sys.executable, "-m", "fleetgen.launcher", "tiny", "parallel.tensor=2",
                            "parallel.pipeline=2", "job.folder=jobs"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert split.returncode == 0, split.stderr
    whole = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    parts = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in parts] == [r["completion"] for r in whole]
    logs = "".join(p.read_text() for p in (tmp_path / "jobs").glob("*/*_log.out"))
    assert "tp 1/2 pp 1/2" in logs  # four real ranks, each holding its own shard
    assert our_processes(str(tmp_path)) == []
