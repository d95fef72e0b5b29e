"""Batches the way SDG users write them, through prepare() and run() against the real engine: chat messages
rendered with the model's template, a record's own fields carried to its output line, OpenAI chat batch files
in and out, and prompts too long for the context window dealt with before any server sees them."""
import json

import openai.types.chat
import pytest
import requests

from fleetgen.launcher.batch import prepare, run
from fleetgen.launcher.batch.prompts import PromptRules
from fleetgen.launcher.errors import LaunchError
from fleetgen.launcher.validate import fit_to_model, read_model
from fleetgen.model.chat_template import CHATML, model_chat_template
from tests.batch_stub import batch_config, read_jsonl, write_jsonl
from tests.server_fixtures import MODEL, build_tiny_checkpoint, serving

CONTEXT = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("chat"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    with serving(checkpoint, max_batch=4, max_seq_len=CONTEXT,
                 chat_template=model_chat_template(None, str(checkpoint), None)) as served:
        yield served


def plan_for(tmp_path, checkpoint, rows, **batch):
    """prepare() as `launch` runs it: the model opened, max_seq_len settled, the prompt rules loaded."""
    cfg = batch_config(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", checkpoint=checkpoint,
                       generation={"tokens_to_generate": 6}, **batch)
    fit_to_model(cfg, read_model(cfg), [])
    return prepare(cfg, PromptRules.load(cfg))


def chat(server, messages, max_tokens=6) -> str:
    answer = requests.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}).json()
    return answer["choices"][0]["message"]["content"]


def test_chat_records_are_rendered_and_their_own_fields_come_along(tmp_path, checkpoint, server):
    rows = [{"id": i, "messages": [{"role": "user", "content": f"def f{i}("}], "expected_answer": i,
             "source": {"set": "demo", "tags": ["a", "b"]}} for i in range(4)]
    rows[2] = {"id": 2, "prompt": "import json", "problem": "p2", "tokens_to_generate": 500}  # too long: skipped
    summary = run(plan_for(tmp_path, checkpoint, rows, long_prompts="skip"), [server.url], None)
    out, errors = read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [r["id"] for r in out] == [0, 1, 3] and summary.audit["ok"]
    for record, row in zip(out, [rows[0], rows[1], rows[3]]):
        assert record["messages"] == row["messages"]
        content = row["messages"][0]["content"]
        assert record["prompt"] == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        assert record["completion"] == chat(server, row["messages"])  # as /v1/chat/completions answers it
        assert "<|im_end|>" in record["params"]["end_strings"]  # the template's turn marker stops it
        assert (record["expected_answer"], record["source"]) == (row["expected_answer"], row["source"])
    [error] = errors
    assert (error["id"], error["problem"], error["status_code"]) == (2, "p2", 400)


def test_an_openai_chat_batch_file_in_and_out(tmp_path, checkpoint, server):
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": f"Say {i}"}],
                      "max_tokens": 5, "temperature": 0}} for i in range(3)]
    rows.append({"custom_id": "t", "method": "POST", "url": "/v1/completions",
                 "body": {"model": "x", "prompt": "def g(", "max_tokens": 3}})
    summary = run(plan_for(tmp_path, checkpoint, rows), [server.url], None)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in out] == ["c0", "c1", "c2", "t"] and summary.failed == 0
    for record, row in zip(out[:3], rows):
        body = openai.types.chat.ChatCompletion.model_validate(record["response"]["body"])
        assert body.object == "chat.completion" and record["response"]["status_code"] == 200
        assert body.choices[0].message.content == chat(server, row["body"]["messages"], 5)
    assert out[3]["response"]["body"]["object"] == "text_completion"


LONG = {"id": "long", "prompt": "word " * 150}  # 150+ tokens: past the 128-token context with 6 new


def length(checkpoint, text) -> int:
    from fleetgen.model.tokenizer import load_tokenizer

    return len(load_tokenizer(checkpoint).encode(text))


def test_long_prompts_are_refused_before_submission_naming_the_lines(tmp_path, checkpoint):
    rows = [{"id": "a", "prompt": "short"}, LONG, {**LONG, "id": "long2"},
            {"id": "chat", "messages": [{"role": "user", "content": "word " * 150}]}]
    with pytest.raises(LaunchError) as refused:
        plan_for(tmp_path, checkpoint, rows)
    message = str(refused.value)
    assert "3 prompt(s) too long for the context window of 128" in message
    n = length(checkpoint, LONG["prompt"])
    assert f"line 2 ({n} tokens + 6 new), line 3 ({n} tokens + 6 new), line 4 (" in message
    assert "batch.long_prompts=skip puts them in the errors file" in message


def test_skipped_long_prompts_go_to_the_errors_file_without_a_request(tmp_path, checkpoint, server):
    rows = [{"id": "a", "prompt": "short"}, LONG, {"id": "b", "prompt": "short too"}]
    summary = run(plan_for(tmp_path, checkpoint, rows, long_prompts="skip"), [server.url], None)
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["id"], e["status_code"]) for e in errors] == [("long", 400)]
    n = length(checkpoint, LONG["prompt"])
    assert f"too long: {n} tokens + 6 new > the context window of 128" in errors[0]["error"]
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["a", "b"] and summary.audit["ok"]


def test_truncate_left_keeps_the_prompts_end(tmp_path, checkpoint, server):
    prompt = "".join(f"item {i}, " for i in range(60))
    tokenizer = server.engine.tokenizer
    ids = tokenizer.encode(prompt)
    assert len(ids) + 6 > CONTEXT
    run(plan_for(tmp_path, checkpoint, [{"id": "t", "prompt": prompt, "greedy": True}], long_prompts="truncate_left"),
        [server.url], None)
    [record] = read_jsonl(tmp_path / "out.jsonl")
    kept = ids[-(CONTEXT - 6):]
    direct = requests.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": kept, "max_tokens": 6, "temperature": 0}).json()
    assert record["completion"] == direct["choices"][0]["text"]
    assert record["prompt"] == prompt and record["prompt_tokens"] == CONTEXT - 6
