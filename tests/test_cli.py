"""`launch` as a user runs it: bad input gets one clear paragraph and a non-zero exit, never a traceback."""
import subprocess
import sys

import pytest


def launch(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fleetgen.launcher", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def assert_clear_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("launch: error:")
    for fragment in fragments:
        assert fragment in message, message


def test_list_names_every_recipe_with_a_description(tmp_path):
    result = launch("--list", cwd=tmp_path)
    assert result.returncode == 0
    lines = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert "tiny" in lines and "CPU" in lines["tiny"]


def test_dry_run_prints_the_resolved_config_and_submits_nothing(tmp_path):
    result = launch("tiny", "--dry-run", "parallel.tensor=2", "job.folder=jobs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tensor: 2" in result.stdout and "recipe: tiny" in result.stdout
    assert not (tmp_path / "jobs").exists()


def test_unknown_recipe_lists_the_known_ones(tmp_path):
    assert_clear_error(launch("nosuchrecipe", cwd=tmp_path), "unknown recipe 'nosuchrecipe'", "tiny")


def test_unknown_override_key_names_it_and_the_valid_keys(tmp_path):
    assert_clear_error(launch("tiny", "parallel.tensr=2", cwd=tmp_path), "parallel.tensr", "tensor",
                       "pipeline")


def test_wrongly_typed_value_names_the_field(tmp_path):
    assert_clear_error(launch("tiny", "parallel.tensor=two", cwd=tmp_path), "parallel.tensor", "'two'")


def test_missing_checkpoint_fails_before_submission(tmp_path):
    assert_clear_error(launch("tiny", "model.checkpoint=/no/such/ckpt", "job.folder=jobs", cwd=tmp_path),
                       "model.checkpoint=/no/such/ckpt", "no such file")
    assert not (tmp_path / "jobs").exists()


def test_missing_input_file(tmp_path):
    assert_clear_error(launch("tiny", "batch.input=absent.jsonl", cwd=tmp_path), "absent.jsonl",
                       "no such file")


def test_malformed_jsonl_line_is_named_by_number(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n')
    assert_clear_error(launch("tiny", "batch.input=in.jsonl", cwd=tmp_path), "in.jsonl, line 3",
                       "not valid JSON")


@pytest.mark.parametrize("line, fragment", [
    ('{"id": 1}', 'a record has a "prompt" (text) or "messages" (a chat), one of them'),
    ('{"prompt": "x", "temprature": 0.5}', "field 'temprature': did you mean 'temperature'?"),
    ('{"prompt": "x", "top_p": 2}', "field top_p"),
    ('["prompt"]', "expected a JSON object"),
])
def test_bad_records_are_named_by_line_and_field(tmp_path, line, fragment):
    (tmp_path / "in.jsonl").write_text('{"prompt": "fine"}\n' + line + "\n")
    assert_clear_error(launch("tiny", "batch.input=in.jsonl", cwd=tmp_path), "line 2", fragment)


def test_tensor_parallel_must_divide_heads(tmp_path):
    assert_clear_error(launch("tiny", "parallel.tensor=3", cwd=tmp_path), "parallel.tensor=3",
                       "num_attention_heads")


def test_local_cluster_has_one_node(tmp_path):
    assert_clear_error(launch("tiny", "parallel.nodes=2", cwd=tmp_path), "parallel.nodes=2", "cluster=slurm")


def test_recipe_architecture_contradicting_the_checkpoint_names_both_values(tmp_path):
    assert_clear_error(launch("tiny", "+model.architecture.num_layers=96", cwd=tmp_path),
                       "model.architecture.num_layers=96", "the checkpoint says")


def test_help_lists_the_modes_the_job_commands_and_the_exit_codes(capsys):
    from fleetgen.launcher import cli

    with pytest.raises(SystemExit) as leaving:
        cli.main(["--help"])
    shown = capsys.readouterr().out
    assert leaving.value.code == 0
    for words in ("serve ", "detach=true", "launch status [JOB]", "launch logs [JOB]", "launch cancel [JOB]",
                  "exit codes:", "130  interrupted"):
        assert words in shown, words


def test_the_resume_command_is_the_command_without_restart():
    from fleetgen.launcher.cli import resume_command

    assert resume_command(["tiny", "batch.restart=true", "batch.input=my in.jsonl"]) == \
        "launch tiny 'batch.input=my in.jsonl'"
