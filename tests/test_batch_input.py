"""The validation pass: the key rules, the two formats, and lines named in every refusal (no server)."""
import json

import pytest

from fleetgen.launcher.batch import prepare
from fleetgen.launcher.errors import LaunchError
from tests.batch_stub import batch_config, write_jsonl


def plan_of(tmp_path, rows, **batch):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    return prepare(batch_config(path, tmp_path / "out.jsonl", **batch))


def refusal(tmp_path, rows, **batch) -> str:
    with pytest.raises(LaunchError) as e:
        plan_of(tmp_path, rows, **batch)
    return str(e.value)


def test_the_issues_input_of_ids_1_1_none_3_is_refused_naming_both_lines(tmp_path):
    message = refusal(tmp_path, [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}, {"prompt": "c"},
                                 {"id": 3, "prompt": "d"}])
    assert "line 3" in message and "line 1" in message and "id" in message  # the mix is found first


def test_a_repeated_id_is_refused_naming_both_lines(tmp_path):
    rows = [{"id": f"r{i}", "prompt": "x"} for i in range(50)] + [{"id": "r7", "prompt": "again"}]
    message = refusal(tmp_path, rows)
    assert "'r7'" in message and "line 51" in message and "line 8" in message


def test_ids_on_some_records_only_are_refused_naming_both_lines(tmp_path):
    message = refusal(tmp_path, [{"prompt": "a"}, {"prompt": "b"}, {"id": 2, "prompt": "c"}])
    assert "line 3 has an \"id\" but line 1 has none" in message


def test_a_numeric_id_equal_to_another_records_line_number_is_its_own_key(tmp_path):
    plan = plan_of(tmp_path, [{"id": 2, "prompt": "a"}, {"id": 1, "prompt": "b"}, {"id": "2", "prompt": "c"}])
    assert (plan.records, plan.items, plan.keyed_by_id) == (3, 3, True)  # 2 and "2" are different keys


def test_without_ids_line_numbers_are_the_keys_and_blank_lines_count(tmp_path):
    plan = plan_of(tmp_path, [{"prompt": "a"}, "", {"prompt": "b"}], samples=3)
    assert (plan.records, plan.items, plan.keyed_by_id, plan.format) == (2, 6, False, "fleetgen")


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "x", "id": 1.5}', '"id" must be a string or an integer'),
    ('{"prompt": "x", "id": true}', '"id" must be a string or an integer'),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"prompt": "x", "temprature": 1}', "field 'temprature': did you mean 'temperature'?"),
    ('{"prompt": "x", "completion": "mine"}', "field(s) completion would collide with the output line's"),
    ('{"messages": [], "prompt": "x"}', 'a "prompt" (text) or "messages" (a chat), one of them'),
    ('{"messages": [{"role": "user", "content": "x"}]}', "need the model's chat template"),
    ('{"prompt": "x", "top_p": 2}', "field top_p"),
    ('{"prompt": "x",', "not valid JSON"),
])
def test_bad_fleetgen_lines_are_named(tmp_path, line, fragment):
    message = refusal(tmp_path, [{"prompt": "fine"}, line])
    assert "in.jsonl, line 2" in message and fragment in message


def openai_line(custom_id, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Hello", **body}}


def test_openai_batch_format_is_detected(tmp_path):
    plan = plan_of(tmp_path, [openai_line("a"), openai_line("b", max_tokens=-1)])
    assert (plan.format, plan.records, plan.keyed_by_id) == ("openai", 2, True)


@pytest.mark.parametrize("change, fragment", [
    ({"url": "/v1/embeddings"}, "'/v1/embeddings' is not served"),
    ({"method": "GET"}, '"method" must be "POST"'),
    ({"body": "text"}, '"body" must be a JSON object'),
    ({"custom_id": ""}, '"custom_id" must be a non-empty string'),
    ({"extra": 1}, "unknown extra"),
])
def test_bad_openai_lines_are_named(tmp_path, change, fragment):
    message = refusal(tmp_path, [openai_line("a"), {**openai_line("b"), **change}])
    assert "line 2" in message and fragment in message


def test_a_repeated_custom_id_is_refused(tmp_path):
    message = refusal(tmp_path, [openai_line("a"), openai_line("b"), openai_line("a")])
    assert "custom_id 'a' on line 3 repeats line 1" in message


def test_openai_format_takes_no_samples(tmp_path):
    assert "batch.samples=2" in refusal(tmp_path, [openai_line("a")], samples=2)


def test_empty_and_missing_inputs(tmp_path):
    assert "no records" in refusal(tmp_path, ["", ""])
    with pytest.raises(LaunchError, match="no such file"):
        prepare(batch_config(tmp_path / "absent.jsonl", tmp_path / "out.jsonl"))


def test_a_changed_input_is_refused_and_restart_starts_over(tmp_path):
    from fleetgen.launcher.batch.ledger import Ledger, ledger_path

    plan = plan_of(tmp_path, [{"prompt": "a"}, {"prompt": "b"}])
    Ledger(ledger_path(plan.output), plan.header, 1).close()
    assert plan_of(tmp_path, [{"prompt": "a"}, {"prompt": "b"}]).items == 2  # same input: resumes
    assert "different input" in refusal(tmp_path, [{"prompt": "a"}, {"prompt": "B"}])
    message = refusal(tmp_path, [{"prompt": "a"}, {"prompt": "b"}], samples=2)
    assert "batch.samples: 1 → 2" in message and "batch.restart=true" in message
    plan = plan_of(tmp_path, [{"prompt": "a"}, {"prompt": "B"}], restart=True)
    assert not ledger_path(plan.output).exists() and plan.items == 2


def test_generation_settings_are_part_of_the_fingerprint(tmp_path):
    from fleetgen.launcher.batch.ledger import Ledger, ledger_path

    plan = plan_of(tmp_path, [{"prompt": "a"}])
    Ledger(ledger_path(plan.output), plan.header, 1).close()
    path = tmp_path / "in.jsonl"
    with pytest.raises(LaunchError) as refused:
        prepare(batch_config(path, tmp_path / "out.jsonl", generation={"tokens_to_generate": 5}))
    assert "(generation.tokens_to_generate: 64 → 5);" in str(refused.value)  # the one changed key, no dicts
    assert json.loads(ledger_path(plan.output).read_text().splitlines()[0])["items"] == 1
