"""Every recipe composes, validates, and renders a Slurm script that the local cluster's sbatch accepts."""
import re
import subprocess

import pytest

from fleetgen.launcher.config import recipes
from tests.goldens import GOLDEN, SEED_RECIPES, dry_run, recipe_text


def test_the_seed_and_tiny_recipes_exist():
    assert set(SEED_RECIPES) | {"tiny", "tiny_tp2pp2", "tiny_slurm"} <= set(recipes())


@pytest.mark.parametrize("recipe", sorted(recipes()))
def test_dry_run_matches_its_golden_file(recipe):
    assert recipe_text(recipe) == (GOLDEN / "recipes" / f"{recipe}.txt").read_text(), "see tools/regold.py"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SEED_RECIPES + ["gpu8_node", "tiny_slurm"])
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
