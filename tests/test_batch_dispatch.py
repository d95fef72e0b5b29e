"""run() against stand-in servers: order, resume, errors, samples' seeds, the OpenAI format, replicas that
fail over, least-outstanding dispatch, timeouts, drain and the token. Fast: no model."""
import json
import threading
import time

import pytest

from fleetgen.launcher.batch import prepare, report, run
from tests.batch_stub import batch_config, read_jsonl, stub_completion, write_jsonl

pytest_plugins = ["tests.batch_stub"]  # the stubs fixture


def prompts(n, bad=()):
    return [{"id": f"r{i}", "prompt": f"prompt number {i}" + (" REFUSE" if i in bad else "")} for i in range(n)]


def go(tmp_path, rows, servers, token=None, drain=None, **batch):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    plan = prepare(batch_config(path, tmp_path / "out.jsonl", **batch))
    return run(plan, [s.url for s in servers], token, drain)


def test_every_record_once_in_input_order_with_summary_and_progress(tmp_path, stubs):
    summary = go(tmp_path, prompts(40), [stubs()], concurrency=3, prompts_per_request=4)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [f"r{i}" for i in range(40)]
    assert out[5]["completion"] == stub_completion("prompt number 5", None) and out[5]["prompt_tokens"] == 3
    assert (summary.complete, summary.done, summary.failed, summary.audit["ok"]) == (True, 40, 0, True)
    assert summary.first_request_s is not None and summary.first_request_s <= summary.wall_s
    on_disk = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert on_disk["audit"]["ok"] and on_disk["fleetgen_version"] and on_disk["config"]["batch"]["concurrency"] == 3
    progress = json.loads((tmp_path / "out.jsonl.progress.json").read_text())
    assert {k: progress[k] for k in ("total", "done", "failed", "complete")} == \
        {"total": 40, "done": 40, "failed": 0, "complete": True}
    assert set(progress) == {"total", "done", "failed", "retried", "prompt_tokens", "prompt_tokens_reused",
                             "completion_tokens", "tokens_per_s", "eta_s", "replicas", "complete", "updated"}
    assert set(progress["replicas"][0]) == {"url", "state", "outstanding", "done", "reason"}
    assert (tmp_path / "out.jsonl.errors.jsonl").read_text() == ""


def test_a_drained_run_stops_and_a_rerun_finishes_without_redoing(tmp_path, stubs):
    slow, drain = stubs(delay_s=0.05), threading.Event()
    threading.Timer(0.4, drain.set).start()
    first = go(tmp_path, prompts(60), [slow], drain=drain, concurrency=2, prompts_per_request=1)
    assert not first.complete and first.stop_reason == "drained" and 0 < first.done < 60
    assert not (tmp_path / "out.jsonl").exists()
    assert json.loads((tmp_path / "out.jsonl.progress.json").read_text())["complete"] is False
    slow.delay_s, slow.sentences = 0, 0
    second = go(tmp_path, prompts(60), [slow], concurrency=2, prompts_per_request=1)
    assert second.complete and slow.sentences == 60 - first.done
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"r{i}" for i in range(60)]


@pytest.mark.parametrize("drain_timeout_s, done", [(60, 2), (0, 0)])
def test_requests_in_flight_when_a_drain_comes_get_the_drain_timeout_to_finish(tmp_path, stubs, drain_timeout_s,
                                                                                 done):
    drain = threading.Event()
    threading.Timer(0.2, drain.set).start()  # seen within a tick (0.5 s), long before the 2 s answers
    summary = go(tmp_path, prompts(6), [stubs(delay_s=2)], drain=drain, concurrency=2, prompts_per_request=1,
                 drain_timeout_s=drain_timeout_s)
    assert (summary.stop_reason, summary.done) == ("drained", done)


def test_a_refused_record_goes_to_the_errors_file_and_the_rest_is_done(tmp_path, stubs):
    summary = go(tmp_path, prompts(30, bad={7, 19}), [stubs()], prompts_per_request=4)
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["id"], e["line"], e["status_code"]) for e in errors] == [("r7", 8, 400), ("r19", 20, 400)]
    assert "REFUSE" in errors[0]["error"] and errors[0]["error"].startswith("HTTP 400")
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 28  # the neighbours that shared their requests too
    assert (summary.failed, summary.done, summary.audit["ok"]) == (2, 28, True)
    assert len(summary.first_errors) == 2


def test_a_run_failing_wholesale_stops_early_with_the_first_errors(tmp_path, stubs, capsys):
    stub = stubs()
    summary = go(tmp_path, prompts(200, bad=set(range(200))), [stub], concurrency=1, prompts_per_request=1,
                 max_error_fraction=0.05)
    assert not summary.complete and summary.stop_reason.startswith("aborted: 11 of 200 items failed")
    assert stub.requests < 20 and len(summary.first_errors) == 5
    summary.resume = "launch tiny batch.input=in.jsonl"
    assert report(summary, 1.0) == 1
    told = capsys.readouterr().err
    assert "stopped (aborted: 11 of 200 items failed" in told and "the summary is in " in told
    assert "To go on anyway, run: launch tiny batch.input=in.jsonl batch.max_error_fraction=0.2" in told


def test_samples_have_their_own_seeds_whatever_the_grouping(tmp_path, stubs):
    outputs = []
    for concurrency, per_request in [(1, 1), (4, 3), (2, 128)]:
        go(tmp_path, prompts(5), [stubs()], concurrency=concurrency, prompts_per_request=per_request, samples=4,
           seed=11, restart=True, generation={"greedy": False})
        outputs.append(read_jsonl(tmp_path / "out.jsonl"))
    assert outputs[0] == outputs[1] == outputs[2]
    first = outputs[0]
    assert [(r["id"], r["sample"]) for r in first] == [(f"r{i}", j) for i in range(5) for j in range(4)]
    seeds = [r["seed"] for r in first]
    assert len(set(seeds)) == 20 and seeds[1] == seeds[0] + 1
    assert all(r["completion"] == stub_completion(r["prompt"], r["seed"]) for r in first)
    go(tmp_path, prompts(5), [stubs()], samples=4, seed=12, restart=True, generation={"greedy": False})
    assert read_jsonl(tmp_path / "out.jsonl")[0]["seed"] != seeds[0]


def test_a_records_own_random_seed_is_its_first_samples(tmp_path, stubs):
    go(tmp_path, [{"prompt": "x", "random_seed": 100}], [stubs()], samples=3, generation={"greedy": False})
    assert [r["seed"] for r in read_jsonl(tmp_path / "out.jsonl")] == [100, 101, 102]


def openai_rows():
    rows = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "gpt-3.5-turbo-instruct", "prompt": f"Say {i}", "max_tokens": 5}} for i in range(6)]
    rows[3]["body"]["max_tokens"] = -1
    return rows


def test_openai_batch_format_out_and_errors_field_by_field(tmp_path, stubs):
    summary = go(tmp_path, openai_rows(), [stubs()])
    out, errors = read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [r["custom_id"] for r in out] == ["req-0", "req-1", "req-2", "req-4", "req-5"]
    for record in out:
        assert set(record) == {"id", "custom_id", "response", "error"} and record["error"] is None
        assert record["id"].startswith("batch_req_")
        assert set(record["response"]) == {"status_code", "request_id", "body"}
        assert record["response"]["status_code"] == 200 and record["response"]["request_id"] == "cmpl-stub"
        assert record["response"]["body"]["object"] == "text_completion"
        assert record["response"]["body"]["model"] == "tiny"  # the served model answers
    [error] = errors
    assert set(error) == {"id", "custom_id", "response", "error"} and error["custom_id"] == "req-3"
    assert error["response"]["status_code"] == 400 and error["error"] is None
    assert error["response"]["request_id"].startswith("req_")
    assert "max_tokens" in error["response"]["body"]["error"]["message"]
    assert (summary.done, summary.failed) == (5, 1)


def test_a_lost_replica_hands_its_work_to_the_other(tmp_path, stubs):
    a, b = stubs(delay_s=0.02), stubs(delay_s=0.02)
    threading.Timer(0.3, lambda: setattr(a, "down", True)).start()
    summary = go(tmp_path, prompts(120), [a, b], concurrency=2, prompts_per_request=2)
    assert summary.complete and summary.failed == 0 and summary.audit["ok"]
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"r{i}" for i in range(120)]
    assert [lost["url"] for lost in summary.lost_replicas] == [a.url]
    assert summary.servers[0]["state"] == "failed" and summary.servers[1]["done"] > summary.servers[0]["done"]
    assert summary.retried > 0


def test_a_replica_answering_503_is_taken_out_then_back_when_healthy(tmp_path, stubs):
    a, b = stubs(delay_s=0.01), stubs(delay_s=0.01)
    a.unavailable = True
    threading.Timer(0.5, lambda: setattr(a, "unavailable", False)).start()
    summary = go(tmp_path, prompts(300), [a, b], concurrency=2, prompts_per_request=1)
    assert summary.complete and summary.failed == 0
    assert summary.lost_replicas[0]["url"] == a.url and "HTTP 503" in summary.lost_replicas[0]["reason"]
    assert summary.servers[0]["state"] == "healthy" and summary.servers[0]["done"] > 0  # taken back


def test_a_timeout_fails_the_replica_not_the_record(tmp_path, stubs):
    hung, fine = stubs(delay_s=3), stubs()
    summary = go(tmp_path, prompts(20), [hung, fine], concurrency=1, prompts_per_request=1,
                 request_timeout_s=0.3, timeout_per_token_s=0.0)
    assert summary.complete and summary.failed == 0
    assert "no answer within 0.3 s" in summary.lost_replicas[0]["reason"]


def test_every_server_lost_stops_the_run_for_a_later_resume(tmp_path, stubs):
    stub = stubs()
    stub.down = True
    summary = go(tmp_path, prompts(5), [stub], replica_wait_s=0.5, max_retries=100)
    assert not summary.complete and "every server was lost" in summary.stop_reason
    assert summary.failed == 0  # transient failures never land in the errors file while retries are left


@pytest.mark.parametrize("kind", ["fleetgen", "openai"])
def test_an_item_that_kills_every_server_is_given_up_after_max_retries(tmp_path, stubs, kind):
    servers = [stubs(crash="CRASH"), stubs(crash="CRASH")]
    rows = prompts(6) if kind == "fleetgen" else openai_rows()[:6]
    rows[3] = ({"id": "r3", "prompt": "CRASH"} if kind == "fleetgen" else
               {**rows[3], "body": {**rows[3]["body"], "max_tokens": 5, "prompt": "CRASH"}})
    drain = threading.Event()  # were it never given up, the run would retry it for ever: stop it instead
    timer = threading.Timer(30, drain.set)
    timer.start()
    try:
        summary = go(tmp_path, rows, servers, drain=drain, concurrency=1, prompts_per_request=1, max_retries=1,
                     max_error_fraction=0.5)
    finally:
        timer.cancel()
    assert summary.complete and (summary.done, summary.failed) == (5, 1), summary.stop_reason
    [error] = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    message = error["error"] if kind == "fleetgen" else error["error"]["message"]
    assert message.startswith("gave up after 2 attempts (batch.max_retries=1); last: "), message
    if kind == "fleetgen":
        assert error == {"id": "r3", "sample": 0, "seed": error["seed"], "line": 4, "status_code": None,
                         "error": message}
    else:
        assert error == {"id": error["id"], "custom_id": "req-3", "response": None,
                         "error": {"code": "server_unavailable", "message": message}}
        assert error["id"].startswith("batch_req_")
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 5 and summary.audit["ok"]


def test_least_outstanding_gives_a_slow_replica_fewer_items(tmp_path, stubs):
    slow, fast = stubs(delay_s=0.2), stubs(delay_s=0.01)
    summary = go(tmp_path, prompts(150), [slow, fast], concurrency=4, prompts_per_request=1)
    assert summary.complete
    assert slow.sentences * 3 < fast.sentences, (slow.sentences, fast.sentences)


def test_the_bearer_token_is_sent_and_a_refused_one_stops_the_run(tmp_path, stubs):
    guarded = stubs(token="s3cret")
    assert go(tmp_path, prompts(6), [guarded], token="s3cret").complete
    summary = go(tmp_path, prompts(6), [guarded], token="wrong", restart=True)
    assert not summary.complete and "HTTP 401" in summary.stop_reason and summary.failed == 0


def test_a_finished_run_rerun_changes_nothing(tmp_path, stubs):
    stub = stubs()
    first = go(tmp_path, prompts(10), [stub])
    before, requests = (tmp_path / "out.jsonl").read_text(), stub.requests
    time.sleep(0.01)
    summary = go(tmp_path, prompts(10), [stub])
    assert summary.complete and stub.requests == requests and (tmp_path / "out.jsonl").read_text() == before
    assert summary == first and first.tokens_per_s > 0  # the run that did the work keeps its figures
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["tokens_per_s"] == first.tokens_per_s


def test_outside_a_terminal_progress_is_a_plain_line(tmp_path, stubs, monkeypatch, capsys):
    from fleetgen.launcher.batch import progress

    monkeypatch.setattr(progress, "SNAPSHOT_EVERY_S", 0.05)
    monkeypatch.setattr(progress, "PLAIN_LINE_EVERY_S", 0.1)
    go(tmp_path, prompts(30), [stubs(delay_s=0.05)], concurrency=1, prompts_per_request=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch: ")]
    assert lines and "/30 items" in lines[-1] and "tokens/s, ETA" in lines[-1] and "1/1 server healthy" in lines[-1]


def test_free_replicas_give_the_least_loaded_free_one_and_skip_stale_entries():
    from fleetgen.launcher.batch.dispatch import FreeReplicas, Replica

    free, replicas = FreeReplicas(concurrency=2, replicas=4), [Replica(f"http://r{i}") for i in range(4)]
    for replica in replicas:
        free.update(replica)
    picked = []
    for load in (5, 1, 3):  # take three and give them work
        replica = free.pop()
        picked.append(replica)
        replica.outstanding, replica.requests = load, 1
        free.update(replica)
    assert picked == replicas[:3]  # equal loads: the one waiting longest first
    assert free.pop() is replicas[3]  # still idle
    replicas[3].state = "failed"
    free.update(replicas[3])  # a lost replica is never given
    assert [free.pop() for _ in range(3)] == [replicas[1], replicas[2], replicas[0]]
    assert free.pop() is None
    replicas[1].requests = 2  # full: not given until a request of it settles
    free.update(replicas[1])
    replicas[0].outstanding = 0  # settled while in the heap: its older entry goes stale
    free.update(replicas[0])
    free.update(replicas[0])
    assert free.pop() is replicas[0] and free.pop() is None
