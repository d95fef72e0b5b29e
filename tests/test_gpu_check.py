"""benchmarks/gpu.py's pure parts: the bandwidth it picks, greedy agreement, the targets and the table. The
check itself runs on a GPU machine (benchmarks/gpu_check.sh), or on the CPU with `--smoke`; neither is here."""
import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu.py")
gpu = sys.modules.setdefault("gpu_check", importlib.util.module_from_spec(SPEC))  # dataclasses look it up
SPEC.loader.exec_module(gpu)


def test_bandwidth_from_the_gpu_name_unless_given():
    assert gpu.pick_bandwidth("NVIDIA H200", None) == (4800.0, "H200")
    assert gpu.pick_bandwidth("NVIDIA H100 80GB HBM3", None) == (3350.0, "H100")
    assert gpu.pick_bandwidth("NVIDIA H200", 4000.0) == (4000.0, "--bandwidth-gbs")
    assert gpu.pick_bandwidth("x86_64", None) == (None, None)


def test_greedy_agreement_counts_up_to_the_first_difference():
    assert gpu.token_agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]) == (4, 6)


def _steps(healthy_s=42.0, startup_s=None) -> dict:
    bf16 = {"error": 0.12, "transformers_error": 0.07, "tokens_agree": 40, "tokens": 48}
    launch = {"healthy_s": healthy_s, "rank0_log": {"imports_and_rendezvous_s": 3.0, "load_s": 5.0,
                                                    "warm_up_s": 20.0},
              "rank0_device": "cuda:0 (nccl)", "wanted_device": "cuda", "health": {"status": "ready"}}
    if startup_s:
        launch["health"]["startup_s"] = startup_s
    return {
        "parity": {"status": "ok", "result": {"gpt2": {"format": "hf", "fp32": {
            "max_abs_logprob_diff": 2e-5, "tokens_agree": 48, "tokens": 48}, "bf16": bf16}}},
        "roofline": {"status": "timeout", "error": "over its budget of 80 s", "result": {
            "batch_1": {"tokens_per_s": 700.0, "roofline_fraction": 0.6}}},
        "serving": {"status": "ok", "result": {
            "checkpoint": {"n_layer": 24, "n_embd": 2048}, "transformers": {"batch 1": 50.0, "batch 64": 3000.0},
            "server": {"1 clients": 120.0, "64 clients": 6000.0}, "launch": launch}},
        "startup": {"status": "ok", "result": {"checkpoint": {"layers": 24}, "launch": launch,
                                               "first_request": {"status": 200, "seconds": 0.5}}},
    }


def test_targets():
    rows = {r["check"]: r for r in gpu.checks(_steps(), gpu.FULL)}
    assert rows["parity fp32 gpt2 (hf)"]["met"] is True
    assert rows["parity bf16 gpt2"]["met"] is True  # 0.12 > 0.1, but within twice transformers' own 0.07
    assert rows["roofline: step"]["met"] is False and "over its budget" in rows["roofline: step"]["value"]
    assert rows["roofline batch 1"]["met"] is True  # what it measured before the budget ran out counts
    assert "roofline batch 64" not in rows
    assert rows["server 1 client / transformers batch 1"]["value"] == "120 / 50 tokens/s = 2.40x"
    assert rows["server 1 client / transformers batch 1"]["met"] is True
    assert rows["server 64 clients / transformers batch 64"]["met"] is False  # 2x < 3x
    assert rows["GPT-2B-001 shape, 24 layers: launch to healthy"]["met"] is True
    assert rows["GPT-2B-001 shape, 24 layers: first request"]["met"] is True
    assert rows["GPT-2 24 x 2048: launch to healthy"]["met"] is None
    assert not any(r["check"].endswith("rank 0 device") for r in rows.values())
    slow = {r["check"]: r for r in gpu.checks(_steps(healthy_s=61.0), gpu.FULL)}
    assert slow["GPT-2B-001 shape, 24 layers: launch to healthy"]["met"] is False


def test_a_rank_on_the_cpu_when_the_gpu_was_asked_for_is_a_failed_check():
    steps = _steps()
    steps["startup"]["result"]["launch"] = dict(steps["startup"]["result"]["launch"], rank0_device="cpu (gloo)",
                                                wanted_device="cuda")
    rows = {r["check"]: r for r in gpu.checks(steps, gpu.FULL)}
    assert rows["GPT-2B-001 shape, 24 layers: rank 0 device"] == {
        "check": "GPT-2B-001 shape, 24 layers: rank 0 device", "value": "cpu (gloo)", "target": "cuda", "met": False}


def test_a_smoke_run_judges_correctness_not_speed():
    rows = {r["check"]: r["met"] for r in gpu.checks(_steps(), gpu.FULL, smoke=True)}
    assert rows["parity fp32 gpt2 (hf)"] is True and rows["roofline: step"] is False
    assert rows["GPT-2B-001 shape, 24 layers: first request"] is True
    assert rows["roofline batch 1"] is None and rows["server 64 clients / transformers batch 64"] is None
    assert rows["GPT-2B-001 shape, 24 layers: launch to healthy"] is None


@pytest.mark.parametrize("startup_s,shown", [
    (None, "42.0 s (/health startup_s n/a; rank 0 log: imports+rendezvous 3.0, load 5.0, warm_up 20.0; "
           "on cuda:0 (nccl))"),
    ({"imports": 2.0, "load": 4.5, "warm_up": 9.0, "rendezvous": 1.0},
     "42.0 s (imports 2.0, load 4.5, warm_up 9.0, capture n/a, rendezvous 1.0; on cuda:0 (nccl))"),
])
def test_startup_breakdown_from_health_else_the_log(startup_s, shown):
    assert gpu.startup_text(_steps(startup_s=startup_s)["startup"]["result"]["launch"]) == shown


def test_table_has_a_line_a_check():
    rows = gpu.checks(_steps(), gpu.FULL)
    lines = gpu.table(rows).splitlines()
    assert lines[0].split() == ["check", "value", "target", "met"] and len(lines) == len(rows) + 1
    assert lines[1].startswith("parity fp32 gpt2 (hf)") and lines[1].endswith("yes")
