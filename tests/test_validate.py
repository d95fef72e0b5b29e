"""The launcher's checks against the checkpoint (launcher/validate.py): the model's own split and length rules,
named by the config keys that chose them, before anything is submitted."""
import subprocess
import sys

import pytest

from fleetgen.conf.schema import LaunchConfig
from fleetgen.launcher.errors import LaunchError
from fleetgen.launcher.validate import check_kv_cache, check_model, fit_max_seq_len
from tests.checkpoint_writers import small_config


def launch_config(**parallel) -> LaunchConfig:
    return LaunchConfig.model_validate({"recipe": "test", "cluster": {"kind": "local"},
                                        "model": {"checkpoint": "/x"}, "parallel": parallel})


@pytest.mark.parametrize("parallel, model, words", [
    ({"tensor": 3}, {}, "parallel.tensor=3: the model's num_attention_heads=8 is not divisible by tensor parallel "
                        "size 3"),
    ({"tensor": 4}, {"num_attention_heads": 12, "num_query_groups": 6},
     "parallel.tensor=4: the model's num_query_groups=6 and tensor parallel size 4 must divide one another"),
    ({"tensor": 4}, {"ffn_hidden_size": 90}, "parallel.tensor=4: the model's ffn_hidden_size=90 is not divisible "
                                             "by tensor parallel size 4"),
    ({"pipeline": 5}, {}, "parallel.pipeline=5: the model's num_layers=4 cannot fill 5 pipeline stages"),
])
def test_each_split_rule_of_the_model_is_named_by_its_config_key(parallel, model, words):
    with pytest.raises(LaunchError) as caught:
        check_model(launch_config(**parallel), small_config(**model))
    assert str(caught.value) == words


def test_a_split_the_model_allows_passes():
    check_model(launch_config(tensor=4, pipeline=4), small_config())  # 2 groups replicated over 4 ranks


@pytest.mark.parametrize("requested, on_command_line, position_embedding, expected", [
    (None, False, "learned", 64),    # unset: the checkpoint's context length
    (512, False, "learned", 64),     # a recipe's value is an upper bound
    (32, False, "learned", 32),
    (32, True, "learned", 32),
    (100, True, "rope", 100),        # rotary positions do not refuse a longer cache
])
def test_max_seq_len_is_the_models_context_unless_set_lower(requested, on_command_line, position_embedding,
                                                            expected):
    cfg = launch_config()
    cfg.model.max_seq_len = requested
    model = small_config(position_embedding=position_embedding)
    assert fit_max_seq_len(cfg, model, on_command_line) == expected


def test_a_kv_cache_that_cannot_hold_one_sequence_on_every_stage_is_refused_before_submission():
    cfg = launch_config(pipeline=2)
    model = small_config()  # 4 layers, 2 a stage; 2 groups of 8 dims: a block is 2 × 2 layers × 16 × 2 × 8 × 4 bytes
    cfg.model.max_seq_len, cfg.model.kv_cache_gb = 64, 4 * 4096 / 2**30  # 4 blocks: 64 positions
    check_kv_cache(cfg, model)
    cfg.model.max_seq_len = 65
    with pytest.raises(LaunchError, match=r"^model.kv_cache_gb=1.52\S* holds 4 blocks of 16 positions \(4096 bytes "
                                          r"each\) on stage 0, not one sequence of max_seq_len=65"):
        check_kv_cache(cfg, model)
    with pytest.raises(ValueError, match="greater than 0"):
        LaunchConfig.model_validate({"recipe": "test", "cluster": {"kind": "local"},
                                     "model": {"checkpoint": "/x", "kv_cache_gb": 0}})


def test_max_seq_len_above_the_models_on_the_command_line_is_an_error():
    cfg = launch_config()
    cfg.model.max_seq_len = 65
    with pytest.raises(LaunchError, match=r"^model.max_seq_len=65 \(on the command line\): max_seq_len=65 exceeds "
                                          r"the model's 64 learned positions"):
        fit_max_seq_len(cfg, small_config(position_embedding="learned"), True)


def launch(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fleetgen.launcher", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_tiny_takes_a_checkpoints_shorter_context_unless_told_otherwise(tmp_path):
    from tests.server_fixtures import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt")  # 128 positions; the tiny recipe says 512
    shown = launch("tiny", f"model.checkpoint={checkpoint}", "--dry-run", cwd=tmp_path)
    assert shown.returncode == 0 and "warning" not in shown.stdout, shown.stdout + shown.stderr
    assert "  max_seq_len: 128\n" in shown.stdout
    refused = launch("tiny", f"model.checkpoint={checkpoint}", "model.max_seq_len=600", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "model.max_seq_len=600 (on the command line): max_seq_len=600 exceeds the model's 128 learned " \
           "positions" in refused.stderr


def test_a_taken_server_port_is_refused_before_submission():
    import socket

    from fleetgen.launcher.validate import check_local_ports

    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        cfg = launch_config()
        cfg.server.port = taken
        with pytest.raises(LaunchError, match=f"server.port={taken}: port {taken} on this machine is taken; "):
            check_local_ports(cfg)


def test_a_chat_template_that_is_neither_built_in_nor_a_file_is_refused_before_submission(tmp_path):
    from fleetgen.launcher.validate import check_chat_template

    cfg = LaunchConfig.model_validate({"recipe": "test", "cluster": {"kind": "local"},
                                       "model": {"checkpoint": str(tmp_path), "chat_template": "llama9"}})
    with pytest.raises(LaunchError, match="model.chat_template=llama9: neither a built-in template"):
        check_chat_template(cfg)
    cfg.model.chat_template = "chatml"
    check_chat_template(cfg)
