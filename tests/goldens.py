"""Golden files: the texts the golden tests compare, made here so that tools/regold.py writes the same texts
(after an intended change) and no test ever writes its own expectation."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fleetgen.conf.schema import LaunchConfig
from fleetgen.launcher.config import CONF_DIR, DATA_DIR, recipes
from fleetgen.slurm.submission import executor_parameters, render_sbatch

GOLDEN = Path(__file__).parent / "golden"
JOB_FOLDER = Path("/shared/fleetgen/jobs/%j")
SEED_RECIPES = ["gpt2b_001", "gptj_6b", "megatron_gpt2_345m", "nemotron4_340b_h200", "nemotron4_340b_h100",
                "nemotron4_340b_a100"]
ANY_CHECKPOINT_RECIPES = ["gpu1", "gpu8_node"]
FAKE_MACHINE = {"CUDA_VISIBLE_DEVICES": "0"}  # local recipes settle their GPUs the same on every machine: 1 GPU
FIXED = ["job.folder=/jobs", "batch.output=/out/results.jsonl", "batch.input=/in/prompts.jsonl"]

CASES = {
    "tp8_pp2_two_nodes_container": [
        "cluster=slurm", "container=nemo", "parallel.nodes=2", "parallel.tensor=8", "parallel.pipeline=2",
        "cluster.partition=batch", "cluster.account=llm", "cluster.exclusive=true", "cluster.time_min=240",
        "container.mounts=[/models:/models:ro,/lustre/data:/data]", "job.name=nemotron"],
    "one_gpu_no_container": ["cluster=slurm", "cluster.gpus_per_node=1"],
    "cpu_ranks_env_setup_sbatch_args": [
        "cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=4", "parallel.tensor=2",
        "parallel.pipeline=2", "cluster.qos=high", "cluster.constraint=h100", "cluster.cpus_per_task=2",
        "cluster.mem_gb=64", "cluster.setup=['module load cuda/12.4','source /opt/venv/bin/activate']",
        "+cluster.env.HF_HOME='/scratch/hf cache'", "+cluster.env.NCCL_DEBUG=INFO",
        "+cluster.sbatch_args.reservation=fleetgen", "+cluster.sbatch_args.mail-type=END",
        "cluster.srun_args=['--cpu-bind=none']", "job.grace_period_s=12.5"],
}


def composed(*overrides: str) -> LaunchConfig:
    """The default config with overrides, typed (no recipe)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model.checkpoint=/x", "recipe=test", *overrides])
    return LaunchConfig.model_validate(OmegaConf.to_container(cfg))


def submission_text(name: str) -> str:
    """CASE.json (submitit's parameters) or CASE.sbatch (the script) of a case of CASES."""
    case, kind = name.rsplit(".", 1)
    cfg = composed(*CASES[case])
    if kind == "json":
        return json.dumps(executor_parameters(cfg, JOB_FOLDER), indent=2) + "\n"
    # The interpreter's path differs between machines; inside a container it is the image's python3.
    return render_sbatch(cfg, JOB_FOLDER).replace(shlex.quote(sys.executable), "PYTHON")


def dry_run(recipe: str, *overrides: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fleetgen.launcher", recipe, "--dry-run", *FIXED, *overrides],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **FAKE_MACHINE})
    if result.returncode:
        raise RuntimeError(f"launch {recipe} --dry-run failed: {result.stderr}")
    # local runs use this interpreter: its path is the machine's, not the recipe's
    text = result.stdout.replace(str(DATA_DIR.resolve()), "<fleetgen data>").replace(str(DATA_DIR), "<fleetgen data>")
    return text.replace(sys.executable, "<python>")


def recipe_text(recipe: str) -> str:
    """recipes/RECIPE.txt: the recipe's dry run (with a checkpoint path where the recipe leaves it unset)."""
    unset = recipe in SEED_RECIPES + ANY_CHECKPOINT_RECIPES
    return dry_run(recipe, *([f"model.checkpoint=/models/{recipe}"] if unset else []))


def all_goldens() -> dict[Path, str]:
    texts = {GOLDEN / f"{case}.{kind}": submission_text(f"{case}.{kind}")
             for case in CASES for kind in ("json", "sbatch")}
    texts.update({GOLDEN / "recipes" / f"{recipe}.txt": recipe_text(recipe) for recipe in recipes()})
    return texts
