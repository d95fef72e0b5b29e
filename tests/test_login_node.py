"""The login node stays light: the launcher's whole path (compose → validate → prepare, and a whole `launch tiny`
batch) runs in a fresh Python without importing torch, over every checkpoint format, and reads the same
architecture that the ranks' reader (open_checkpoint, with torch) finds."""
import dataclasses
import json
import os
import subprocess
import sys
import tarfile

import pytest

from fleetgen.launcher.config import DATA_DIR
from fleetgen.model.checkpoint.open import open_checkpoint
from tests.checkpoint_writers import (GPT2_HEAD64, NEMO_GELU, NEMOTRON, canonical_tensors, gpt2_config, make_config,
                                      nemo_config, rewrite, write_distckpt, write_megatron, write_nemo)

TEXT = "Prompt tokens, counted on the login node: café 東京 ½"
# compose → validate → prepare, as `launch` runs them before submitting; then what this process imported
VALIDATE = f"TEXT = {TEXT!r}" + """
import dataclasses, json, sys
from omegaconf import OmegaConf
from fleetgen.launcher import batch
from fleetgen.launcher.config import compose_recipe, parse_config
from fleetgen.launcher.batch.prompts import PromptRules
from fleetgen.launcher.validate import read_model, validate

overrides = sys.argv[1:]
cfg = parse_config(OmegaConf.to_container(compose_recipe("tiny", overrides)))
validate(cfg, overrides)
rules = PromptRules.load(cfg)
plan = batch.prepare(cfg, rules)
print(json.dumps({"model": dataclasses.asdict(read_model(cfg)), "records": plan.records,
                  "tokens": rules.tokenizer.encode(TEXT),
                  "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""
# the `launch` command itself, run to its end in this process; the ranks are processes of their own
LAUNCH = """
import json, sys
from fleetgen.launcher.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""


def fresh_python(script: str, *args, cwd, timeout: int, stderr: list | None = None):
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "HOME": str(cwd)})  # .nemo cache
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if stderr is not None:
        stderr.append(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def nemo_tar(tmp_path, sp_model):
    config = make_config(NEMO_GELU, sp_model)
    return write_nemo(tmp_path / "gelu.nemo", config, canonical_tensors(config), sp_model, 2, 2, archive="tar")


def nemo_folder(tmp_path, sp_model):
    config = nemo_config(sp_model)
    return write_nemo(tmp_path / "nemo", config, canonical_tensors(config), sp_model, tp=2, pp=2)


def megatron_args(tmp_path, bpe_dir):
    config = gpt2_config(bpe_dir)
    return write_megatron(tmp_path / "megatron", config, canonical_tensors(config), tp=2, tokenizer_dir=bpe_dir)


def megatron_shapes(tmp_path, bpe_dir):  # no args saved: the architecture comes from the tensors' shapes
    config = make_config(GPT2_HEAD64, bpe_dir / "vocab.json")
    return write_megatron(tmp_path / "megatron", config, canonical_tensors(config), tp=2, pp=2, version=0,
                          with_args=False, tokenizer_dir=bpe_dir)


def distckpt_zarr(tmp_path, sp_model):
    config = make_config(NEMOTRON, sp_model)
    return write_distckpt(tmp_path / "dist", config, canonical_tensors(config), sp_model, tp=2)


def distckpt_nemo_tar(tmp_path, sp_model):
    config = make_config(NEMOTRON, sp_model)
    directory = write_distckpt(tmp_path / "dist", config, canonical_tensors(config), sp_model, 2, "torch_dist")
    with tarfile.open(tmp_path / "nemotron.nemo", "w:") as tar:
        tar.add(directory, arcname=".")
    return tmp_path / "nemotron.nemo"


@pytest.mark.parametrize("write, tokenizer", [
    (lambda tmp_path, sp_model, bpe_dir: DATA_DIR / "tiny-gpt2", None),  # Hugging Face: config.json
    (lambda tmp_path, sp_model, bpe_dir: nemo_tar(tmp_path, sp_model), "sp_model"),
    (lambda tmp_path, sp_model, bpe_dir: nemo_folder(tmp_path, sp_model), None),
    (lambda tmp_path, sp_model, bpe_dir: megatron_args(tmp_path, bpe_dir), None),
    (lambda tmp_path, sp_model, bpe_dir: megatron_shapes(tmp_path, bpe_dir), None),
    (lambda tmp_path, sp_model, bpe_dir: distckpt_zarr(tmp_path, sp_model), None),
    (lambda tmp_path, sp_model, bpe_dir: distckpt_nemo_tar(tmp_path, sp_model), None),
], ids=["hf", "nemo-tar", "nemo-folder", "megatron-args", "megatron-shapes", "distckpt-zarr", "distckpt-nemo-tar"])
def test_validation_reads_every_format_without_torch(tmp_path, sp_model, bpe_dir, write, tokenizer):
    checkpoint = write(tmp_path, sp_model, bpe_dir)
    overrides = [f"model.checkpoint={checkpoint}", f"batch.output={tmp_path / 'out.jsonl'}",
                 "batch.long_prompts=skip"]  # tiny's prompts, some too long for these small checkpoints
    if tokenizer:  # a tokenizer given on the command line replaces the checkpoint's own
        overrides.append(f"model.tokenizer={sp_model}")
    seen = fresh_python(VALIDATE, *overrides, cwd=tmp_path, timeout=120)
    assert seen["torch"] == []
    assert seen["records"] > 0
    ranks_see = open_checkpoint(checkpoint, tokenizer=sp_model if tokenizer else None, cache_dir=tmp_path / "cache")
    assert seen["model"] == json.loads(json.dumps(dataclasses.asdict(ranks_see.config)))
    assert seen["tokens"] == ranks_see.tokenizer().encode(TEXT)  # prompts are counted as the ranks count them


@pytest.mark.slow
def test_a_whole_launch_tiny_batch_never_imports_torch_in_the_launcher(tmp_path):
    seen = fresh_python(LAUNCH, "tiny", "job.folder=jobs", "generation.tokens_to_generate=4", cwd=tmp_path,
                        timeout=600)
    assert seen == {"code": 0, "torch": []}
    assert (tmp_path / "results.jsonl").read_text().count("\n") == \
        sum(1 for line in (DATA_DIR / "tiny_prompts.jsonl").read_text().splitlines() if line.strip())


def test_a_checkpoint_lacking_a_tensor_is_refused_before_submission_without_torch(tmp_path, bpe_dir):
    checkpoint = megatron_args(tmp_path, bpe_dir)
    shard = checkpoint / "release" / "mp_rank_01" / "model_optim_rng.pt"
    rewrite(shard, lambda sd: sd["model"]["language_model"]["encoder"].pop("layers.0.mlp.dense_4h_to_h.weight"))
    stderr = []
    seen = fresh_python(LAUNCH, "tiny", f"model.checkpoint={checkpoint}", "job.folder=jobs", cwd=tmp_path,
                        timeout=120, stderr=stderr)
    assert seen == {"code": 2, "torch": []}
    assert f"launch: error: model.checkpoint={checkpoint}: {shard}: missing key " in stderr[0]
    assert not (tmp_path / "jobs").exists()  # nothing was submitted


def test_a_hugging_face_checkpoint_without_its_weights_is_refused_before_submission_without_torch(tmp_path):
    import shutil

    checkpoint = tmp_path / "hf"
    shutil.copytree(DATA_DIR / "tiny-gpt2", checkpoint)
    (checkpoint / "model.safetensors").unlink()
    stderr = []
    seen = fresh_python(LAUNCH, "tiny", f"model.checkpoint={checkpoint}", "job.folder=jobs", cwd=tmp_path,
                        timeout=120, stderr=stderr)
    assert seen == {"code": 2, "torch": []}
    assert f"{checkpoint}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin" in stderr[0]
    assert not (tmp_path / "jobs").exists()
