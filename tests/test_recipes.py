"""Every recipe composes, validates, and renders a Slurm script that the local cluster's sbatch accepts."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleetgen.launcher.config import DATA_DIR, recipes

GOLDEN = Path(__file__).parent / "golden" / "recipes"
SEED_RECIPES = ["gpt2b_001", "gptj_6b", "megatron_gpt2_345m", "nemotron4_340b_h200", "nemotron4_340b_h100",
                "nemotron4_340b_a100"]
FIXED = ["job.folder=/jobs", "batch.output=/out/results.jsonl", "batch.input=/in/prompts.jsonl"]


def dry_run(recipe, *overrides):
    result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", recipe, "--dry-run", *FIXED, *overrides],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # local runs use this interpreter: its path is the machine's, not the recipe's
    text = result.stdout.replace(str(DATA_DIR.resolve()), "<fleetgen data>").replace(str(DATA_DIR), "<fleetgen data>")
    return text.replace(sys.executable, "<python>")


def test_the_seed_and_tiny_recipes_exist():
    assert set(SEED_RECIPES) | {"tiny", "tiny_tp2pp2", "tiny_slurm"} <= set(recipes())


@pytest.mark.parametrize("recipe", sorted(recipes()))
def test_dry_run_matches_its_golden_file(recipe):
    overrides = [f"model.checkpoint=/models/{recipe}"] if recipe in SEED_RECIPES else []
    text = dry_run(recipe, *overrides)
    golden = GOLDEN / f"{recipe}.txt"
    if os.environ.get("FLEETGEN_REGOLD"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SEED_RECIPES + ["tiny_slurm"])
def test_sbatch_test_only_accepts_the_recipes_script(recipe, tmp_path):
    """The local cluster has 2 GPUs per node and partition debug: only those counts are changed."""
    text = dry_run(recipe, f"model.checkpoint=/models/{recipe}", "cluster.partition=debug")
    script = text[text.index("#!/bin/bash"):]
    script = re.sub(r"--gpus-per-node=\d+", "--gpus-per-node=2", script)
    script = re.sub(r"--ntasks-per-node=\d+", "--ntasks-per-node=2", script)
    script = re.sub(r"#SBATCH --(output|error)=\S+", rf"#SBATCH --\1={tmp_path}/%j.log", script)
    (tmp_path / "job.sh").write_text(script)
    result = subprocess.run(["sbatch", "--test-only", str(tmp_path / "job.sh")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "to start at" in result.stderr
