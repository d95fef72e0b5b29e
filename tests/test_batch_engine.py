"""run() against the real engine behind real in-process servers: sampled text that does not depend on the
grouping, records the server refuses mid-run, OpenAI's batch format, and failover between two servers."""
import threading
import time

import openai.types
import pytest

from fleetgen.launcher.batch import prepare, run
from tests.batch_stub import batch_config, read_jsonl, write_jsonl
from tests.server_fixtures import checkpoint, serving  # noqa: F401  (checkpoint is a fixture)


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: F811
    with serving(checkpoint, max_batch=4, max_seq_len=128) as served:
        yield served


def go(tmp_path, rows, urls, name="out.jsonl", **batch):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    plan = prepare(batch_config(path, tmp_path / name, **batch))
    return run(plan, urls, None)


PROMPTS = [{"prompt": text} for text in ["def encode(", "Café, naïve", "class JSONDecoder", "import re",
                                         "return self", "東京 and"]]


def test_sampled_text_is_the_same_whatever_concurrency_and_prompts_per_request(tmp_path, server):
    sampled = {"greedy": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "tokens_to_generate": 8}
    go(tmp_path, PROMPTS, [server.url], "a.jsonl", concurrency=1, prompts_per_request=1, samples=3, seed=5,
       generation=sampled)
    go(tmp_path, PROMPTS, [server.url], "b.jsonl", concurrency=4, prompts_per_request=3, samples=3, seed=5,
       generation=sampled)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert len(a) == 18 and a == b
    assert len({r["seed"] for r in a}) == 18
    for i in range(6):  # a record's samples differ from each other
        assert len({r["completion"] for r in a[3 * i:3 * i + 3]}) > 1


def test_an_over_long_prompt_and_an_out_of_range_value_mid_run_go_to_the_errors_file(tmp_path, server):
    rows = [{"id": i, "prompt": f"line {i} of the batch"} for i in range(12)]
    rows[4] = {"id": 4, "prompt": "word " * 200}                     # past the 128-token context
    rows[8] = {"id": 8, "prompt": "fine", "random_seed": 2 ** 63 - 1}  # the server's seeds stop below
    summary = go(tmp_path, rows, [server.url], generation={"tokens_to_generate": 4})
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["id"], e["line"], e["status_code"]) for e in errors] == [(4, 5, 400), (8, 9, 400)]
    assert "context window" in errors[0]["error"] and "random_seed" in errors[1]["error"]
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [i for i in range(12) if i not in (4, 8)]
    assert (summary.complete, summary.done, summary.failed, summary.audit["ok"]) == (True, 10, 2, True)


def test_openai_batch_format_through_the_real_server(tmp_path, server):
    rows = [{"custom_id": f"task-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "gpt-3.5-turbo-instruct", "prompt": f"def f{i}(", "max_tokens": 6,
                      "temperature": 0}} for i in range(4)]
    rows[2]["body"]["temperature"] = -1
    summary = go(tmp_path, rows, [server.url])
    out, errors = read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [r["custom_id"] for r in out] == ["task-0", "task-1", "task-3"] and (summary.done, summary.failed) == (3, 1)
    for record in out:
        completion = openai.types.Completion.model_validate(record["response"]["body"])
        assert completion.model == "tiny" and len(completion.choices) == 1 and completion.usage.prompt_tokens > 0
        assert record["response"]["request_id"] == completion.id and record["error"] is None
    [error] = errors
    assert error["custom_id"] == "task-2" and error["response"]["status_code"] == 400 and error["error"] is None
    assert "temperature" in error["response"]["body"]["error"]["message"]


def shut_down_after(server, ledger, entries: int) -> None:
    """Stop a server mid-run: once the ledger holds some entries (the header is its first line)."""
    while not ledger.exists() or len(ledger.read_text().splitlines()) <= entries:
        time.sleep(0.02)
    server.shutdown()


def test_failover_between_two_real_servers(tmp_path, checkpoint, server):  # noqa: F811
    rows = [{"id": i, "prompt": f"def function_{i}(x):"} for i in range(60)]
    generation = {"tokens_to_generate": 6}
    go(tmp_path, rows, [server.url], "alone.jsonl", generation=generation)
    with serving(checkpoint, max_batch=4, max_seq_len=128) as doomed:
        threading.Thread(target=shut_down_after, args=(doomed.server, tmp_path / "pair.jsonl.ledger.jsonl", 8),
                         daemon=True).start()
        summary = go(tmp_path, rows, [doomed.url, server.url], "pair.jsonl", generation=generation,
                     concurrency=2, prompts_per_request=1)
    assert summary.complete and summary.failed == 0
    assert [lost["url"] for lost in summary.lost_replicas] == [doomed.url]
    assert read_jsonl(tmp_path / "pair.jsonl") == read_jsonl(tmp_path / "alone.jsonl")
