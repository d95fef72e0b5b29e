"""The dispatcher's decisions on their own, with the test answering in the servers' place and the clock stopped:
how an answer is judged, what a lost replica, a refused record or an item past its retries becomes, when the
run stops. Fast: no server, no event loop (test_batch_dispatch.py drives the whole run against stand-ins)."""
import asyncio
import json

import pytest

from fleetgen.launcher.batch import dispatch, prepare
from fleetgen.launcher.batch.dispatch import (FIRST_ERRORS_SHOWN, MAX_PROBE_BACKOFF_S, Answer, Dispatcher,
                                              FreeReplicas, Replica)
from fleetgen.launcher.batch.inputs import records
from fleetgen.launcher.batch.ledger import Ledger, entries, ledger_path
from fleetgen.launcher.batch.prompts import Fit
from fleetgen.launcher.batch.source import WorkSource
from tests.batch_stub import batch_config, write_jsonl

NOW = 1000.0


class Clock:
    def __init__(self):
        self.now = NOW

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(dispatch.time, "monotonic", clock)
    return clock


def dispatcher(tmp_path, n=4, servers=("http://a/",), **batch) -> Dispatcher:
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(n)])
    plan = prepare(batch_config(path, tmp_path / "out.jsonl", **batch))
    fmt, settings = plan.make_format(), plan.cfg.batch
    ledger = Ledger(ledger_path(plan.output), plan.header, settings.samples)
    source = WorkSource(records(plan.input, fmt), fmt, settings.samples, ledger.done, settings.prompts_per_request)
    d = Dispatcher(source, fmt, ledger, list(servers), None, settings, "tiny", plan.items)
    d._send = lambda group: None  # a request admitted is not sent: the test answers it (d._settle)
    for replica in d.replicas:  # as the run starts
        d._free.update(replica)
    return d


def admitted(d: Dispatcher) -> list:
    """The requests in flight, in the order they were admitted."""
    d._admit()
    return sorted((g for r in d.replicas for g in r.in_flight), key=lambda g: g.items[0].position)


def ledger_lines(d: Dispatcher) -> list[dict]:
    d._ledger.flush()
    return [head for _, head, _ in entries(d._ledger.path)]


def keys(items) -> list:
    return [item.record.key for item in items]


# ---- judging an answer

def good_answer(items) -> dict:
    n = len(items)
    return {"sentences": [i.record.prompt + " x" for i in items], "token_ids": [[1, 2, 3]] * n,
            "offsets": [[0, 3, 9]] * n, "logprob": None}


@pytest.mark.parametrize("status, kind", [
    (400, "record"), (404, "record"), (422, "record"), (499, "record"),
    (408, "replica"), (429, "replica"), (500, "replica"), (503, "replica"), (302, "replica"), (399, "replica"),
    (401, "fatal"), (403, "fatal"),
])
def test_a_client_error_is_the_records_a_server_error_the_replicas_and_a_refused_token_ends_the_run(
        tmp_path, status, kind):
    d = dispatcher(tmp_path)
    items = d._source.take()
    answer = d._judge(items, status, {"error": "why"})
    assert (answer.kind, answer.status) == (kind, status)
    assert answer.message.startswith(f"HTTP {status}: why")
    assert answer.message.endswith("(the server refused the launcher's token)") == (kind == "fatal")
    if kind == "record":
        assert answer.body == {"error": "why"}


def test_a_good_answer_is_ok_and_a_malformed_one_the_replicas_fault(tmp_path):
    d = dispatcher(tmp_path)
    items = d._source.take()
    ok = d._judge(items, 200, good_answer(items))
    assert ok.kind == "ok" and [r["id"] for r, _ in ok.results] == keys(items)
    for body in ({}, [], "text", {"sentences": None}):
        bad = d._judge(items, 200, body)
        assert bad.kind == "replica" and bad.message.startswith("malformed answer ("), body


@pytest.mark.parametrize("body, text", [
    ({"error": "tokens_to_generate: too many"}, "tokens_to_generate: too many"),  # NeMo's
    ({"error": {"message": "max_tokens: too small", "code": 400}}, "max_tokens: too small"),  # OpenAI's
    ({"error": {"code": 400}}, "{'code': 400}"),
    ({"detail": "no"}, "{'detail': 'no'}"),
    ({"error": ""}, ""),
    ("Bad Gateway", "Bad Gateway"),
    ("x" * 600, "x" * 500),
])
def test_an_errors_text_is_the_servers_message(tmp_path, body, text):
    d = dispatcher(tmp_path)
    assert d._judge(d._source.take(), 400, body).message == f"HTTP 400: {text}"


def test_an_answer_that_is_not_json_is_kept_as_its_first_500_characters():
    assert dispatch._json_or_text(b'{"error": "e"}') == {"error": "e"}
    assert dispatch._json_or_text(b"<html>" + b"y" * 600) == "<html>" + "y" * 494
    assert dispatch._json_or_text(b"\xff\xfe") == "\ufffd\ufffd"


def test_a_request_may_take_the_request_timeout_plus_the_per_token_timeout_for_each_token_it_asks(tmp_path):
    d = dispatcher(tmp_path, prompts_per_request=3, request_timeout_s=10, timeout_per_token_s=0.5,
                   generation={"tokens_to_generate": 4})
    assert d._timeout_s(d._source.take()) == 10 + 0.5 * 3 * 4


# ---- admitting work

def test_the_free_replicas_drop_their_stale_entries_past_4_a_replica_plus_64_and_keep_the_live_ones():
    free, replicas = FreeReplicas(concurrency=1, replicas=3), [Replica(f"http://r{i}") for i in range(3)]
    sizes = []
    for replica in replicas:
        free.update(replica)
    for _ in range(200):  # r0's older entries go stale
        free.update(replicas[0])
        sizes.append(len(free))
    assert max(sizes) == 4 * 3 + 64 and min(sizes) == 3  # bounded, and compacted only past the bound
    live = [free.pop() for _ in range(4)]
    assert live[:2] == replicas[1:] and live[2:] == [replicas[0], None]



def test_each_free_slot_takes_a_request_and_the_replica_counts_it(tmp_path):
    d = dispatcher(tmp_path, n=7, concurrency=2, prompts_per_request=3)
    groups = admitted(d)
    replica = d.replicas[0]
    assert replica.url == "http://a" and [keys(g.items) for g in groups] == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]
    assert (replica.requests, replica.outstanding, d.in_flight) == (2, 6, 6)
    assert d._free.pop() is None  # both slots taken


def test_no_request_is_admitted_once_the_run_stops(tmp_path):
    d = dispatcher(tmp_path)
    d._stop("drained")
    assert admitted(d) == [] and d.in_flight == 0


# ---- settling an answer

def test_an_ok_answer_records_each_item_and_frees_the_slot(tmp_path):
    d = dispatcher(tmp_path, n=2, concurrency=1, prompts_per_request=2)
    [group] = admitted(d)
    answer = {**good_answer(group.items), "cached_tokens": [1, 2]}  # prompt tokens the server found in its cache
    d._settle(group, d._judge(group.items, 200, answer))
    replica = d.replicas[0]
    assert (replica.requests, replica.outstanding, replica.done, d.in_flight, d.done_now) == (0, 0, 2, 0, 2)
    assert (replica.completion_tokens, replica.reused_tokens, d.prompt_tokens_now, d.completion_tokens_now) == \
        (2, 3, 4, 2)
    assert [(e["k"], e["ok"], e["tokens"]) for e in ledger_lines(d)] == \
        [("r0", True, [2, 1, 1]), ("r1", True, [2, 1, 2])]
    assert d._ledger.reused_tokens == 3
    assert d._free.pop() is replica


def test_a_shared_request_refused_is_split_and_a_record_refused_alone_fails(tmp_path):
    d = dispatcher(tmp_path, n=3, concurrency=1, prompts_per_request=2)
    refused = Answer("record", status=400, body={"error": "no"}, message="HTTP 400: no")
    [group] = admitted(d)
    d._source.give_back(d._source.take())  # r2, given back by a lost server meanwhile
    d._settle(group, refused)
    assert d._ledger.finished == 0 and d.in_flight == 0
    [alone] = admitted(d)
    assert keys(alone.items) == ["r0"]  # each asked for alone, before any other work
    d._settle(alone, refused)
    [entry] = ledger_lines(d)
    assert (entry["k"], entry["ok"], d._ledger.failed, d.first_errors) == \
        ("r0", False, 1, ["key 'r0' (line 1, sample 0): HTTP 400: no"])
    assert [keys(d._source.take()) for _ in range(2)] == [["r1"], ["r2"]]
    assert d.replicas[0].state == "healthy"  # the record's fault, never the replica's


def test_a_prompt_refused_at_validation_is_answered_as_a_servers_400_without_a_request(tmp_path):
    d = dispatcher(tmp_path, n=1, concurrency=1)
    [group] = admitted(d)
    group.items[0].record.fit = Fit(900, too_long=True, refusal="the prompt is too long")  # batch.long_prompts=skip
    calls = []
    d._loop = type("Loop", (), {"call_soon": lambda self, *call: calls.append(call)})()
    Dispatcher._send(d, group)  # the real one: the fixture's stand-in sends nothing
    [(answered, same, answer)] = calls
    assert answered == d._answered and same is group and group.timeout == 0.0  # no request, no timer
    assert (answer.kind, answer.status, answer.message) == ("record", 400, "the prompt is too long")
    assert answer.body == {"error": {"message": "the prompt is too long", "type": "invalid_request_error",
                                     "param": None, "code": 400}}  # OpenAI's error, as a server would answer


def test_a_replica_that_fails_a_request_is_taken_out_and_its_work_given_back(tmp_path, clock):
    d = dispatcher(tmp_path, n=4, concurrency=2, prompts_per_request=2)
    first, second = admitted(d)
    d._settle(first, Answer("replica", message="ConnectionResetError"))
    replica = d.replicas[0]
    assert (replica.state, replica.reason, replica.failures, replica.probe_at) == \
        ("failed", "ConnectionResetError", 1, NOW + 1)  # probed in 1 s
    assert second.abandoned and d.in_flight == 0 and d.retried == 4
    assert sorted(keys(d._source.take())[0] for _ in range(4)) == ["r0", "r1", "r2", "r3"]  # each alone
    assert d._free.pop() is None  # never given work while it is out
    d._settle(second, Answer("replica", message="late"))  # the abandoned request's own answer changes nothing
    assert (replica.reason, replica.failures, d.in_flight, d.retried, replica.requests) == \
        ("ConnectionResetError", 1, 0, 4, 0)


def test_an_abandoned_requests_answer_still_counts_and_a_refusal_of_it_is_ignored(tmp_path, clock):
    d = dispatcher(tmp_path, n=4, concurrency=2, prompts_per_request=2)
    first, second = admitted(d)
    d._lose(d.replicas[0], "lost")
    d._settle(first, d._judge(first.items, 200, good_answer(first.items)))
    d._settle(second, Answer("record", status=400, message="HTTP 400: no"))
    assert [e["k"] for e in ledger_lines(d)] == ["r0", "r1"] and d._ledger.failed == 0 and d.in_flight == 0


def test_a_lost_replicas_idle_connections_are_closed_and_those_in_flight_left_to_answer(tmp_path, clock):
    d = dispatcher(tmp_path)
    closed, pool = [], d.replicas[0].pool
    pool.close_idle, pool.close = (lambda: closed.append("idle")), (lambda: closed.append("every"))
    d._lose(d.replicas[0], "lost")
    assert closed == ["idle"]  # a server that comes back has reset them; an answer in flight still counts


def test_a_lost_replica_is_probed_later_each_time_up_to_the_most(tmp_path, clock):
    d = dispatcher(tmp_path)
    replica = d.replicas[0]
    d._lose(replica, "first")
    d._lose(replica, "again")  # already out: nothing changes
    assert (replica.reason, replica.failures, replica.probe_at) == ("first", 1, NOW + 1)
    replica.state = "healthy"
    d._lose(replica, "second")
    assert (replica.failures, replica.probe_at) == (2, NOW + 2)
    replica.state, replica.failures = "healthy", 30
    d._lose(replica, "many")
    assert replica.probe_at == NOW + MAX_PROBE_BACKOFF_S == NOW + 60  # at least once a minute


def probe_once(d: Dispatcher, monkeypatch, healthy: bool) -> None:
    """One round of the prober: it looks at the lost replicas that are due, then sleeps a tick (stopped there)."""
    class Round(Exception):
        pass

    real_sleep = asyncio.sleep

    async def sleep(seconds):
        if seconds == dispatch.TICK_S:
            raise Round
        await real_sleep(seconds)

    async def answer(pool):
        return healthy

    monkeypatch.setattr(dispatch, "_healthy", answer)
    monkeypatch.setattr(dispatch.asyncio, "sleep", sleep)
    with pytest.raises(Round):
        asyncio.run(d._probe())
    monkeypatch.setattr(dispatch.asyncio, "sleep", real_sleep)


def test_a_lost_replica_is_probed_after_1_s_doubling_to_60_s_and_taken_back_when_healthy(
        tmp_path, clock, monkeypatch):
    d = dispatcher(tmp_path, n=2, prompts_per_request=1)
    replica = d.replicas[0]
    d._lose(replica, "lost")
    waits = [replica.probe_at - clock.now]
    probe_once(d, monkeypatch, healthy=False)  # not due yet: not probed
    assert replica.probe_at - clock.now == waits[0]
    for _ in range(7):
        clock.now = replica.probe_at
        probe_once(d, monkeypatch, healthy=False)
        waits.append(replica.probe_at - clock.now)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60] and replica.state == "failed"  # as the README says
    clock.now = replica.probe_at
    probe_once(d, monkeypatch, healthy=True)
    assert replica.state == "healthy" and replica.outstanding == 2  # taken back, and given the work at once


def test_a_replica_is_healthy_only_when_its_health_check_answers_200():
    import socket

    from fleetgen.launcher.batch.http import Pool
    from tests.batch_stub import StubServer

    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    up, starting = StubServer(), StubServer()
    starting.unavailable = True

    async def look(url):
        return await dispatch._healthy(Pool(url, {}))

    try:
        assert [asyncio.run(look(url)) for url in (up.url, starting.url, f"http://127.0.0.1:{port}")] == \
            [True, False, False]
    finally:
        up.close()
        starting.close()


def test_a_refused_token_stops_the_run_with_the_first_reason(tmp_path):
    d = dispatcher(tmp_path, concurrency=2, prompts_per_request=2)
    first, second = admitted(d)
    d._settle(first, Answer("fatal", status=401, message="HTTP 401: first"))
    d._settle(second, Answer("fatal", status=403, message="HTTP 403: second"))
    assert d.stop_reason == "HTTP 401: first" and d._ledger.finished == 0


# ---- retries, failures, stopping

def test_an_item_is_retried_max_retries_times_then_given_up(tmp_path):
    d = dispatcher(tmp_path, n=1, max_retries=2)
    [item] = d._source.take()
    for attempt in (1, 2):
        d._retry([item], "lost")
        assert d._source.take() == [item] and item.attempts == attempt and d._ledger.finished == 0
    d._retry([item], "lost again")
    assert d._source.take() == [] and d.retried == 3
    [entry] = ledger_lines(d)
    assert (entry["k"], entry["ok"]) == ("r0", False)
    assert d.first_errors == ["key 'r0' (line 1, sample 0): gave up after 3 attempts (batch.max_retries=2); "
                              "last: lost again"]


def test_only_the_first_errors_are_kept_and_the_run_aborts_past_the_error_fraction(tmp_path):
    d = dispatcher(tmp_path, n=20, prompts_per_request=1, max_error_fraction=0.25)
    items = [d._source.take()[0] for _ in range(6)]
    for item in items[:5]:
        d._fail(item, "HTTP 400: no", 400, None)
    assert d.stop_reason is None  # 5 of 20: not more than a quarter
    d._fail(items[0], "twice", 400, None)  # already failed: not counted again
    assert d.stop_reason is None and d._ledger.failed == 5 and d.done_now == 5
    d._fail(items[5], "HTTP 400: no", 400, None)
    assert d.stop_reason == "aborted: 6 of 20 items failed, more than batch.max_error_fraction=0.25"
    assert len(d.first_errors) == FIRST_ERRORS_SHOWN == 5
    assert d.first_errors[-1] == "key 'r4' (line 5, sample 0): HTTP 400: no"


def test_the_run_stops_once_every_server_is_lost_for_longer_than_the_wait(tmp_path, clock):
    d = dispatcher(tmp_path, servers=("http://a", "http://b"), replica_wait_s=30)
    d._check_servers_left()
    for replica in d.replicas:
        d._lose(replica, f"{replica.url[-1]} lost")
    d._check_servers_left()
    clock.now += 30
    d._check_servers_left()
    assert d.stop_reason is None  # not longer than the wait yet
    d.replicas[1].state = "healthy"  # one came back: the wait starts again when it is lost again
    clock.now += 20
    d._check_servers_left()
    d.replicas[1].state = "failed"
    clock.now += 20
    d._check_servers_left()
    clock.now += 30
    d._check_servers_left()
    assert d.stop_reason is None
    clock.now += 0.5
    d._check_servers_left()
    assert d.stop_reason == ("every server was lost for more than 30 s (batch.replica_wait_s): "
                             "http://a: a lost; http://b: b lost")


def test_the_run_is_finished_when_nothing_is_left_to_take_or_in_flight(tmp_path):
    d = dispatcher(tmp_path, n=2, prompts_per_request=2)
    assert not d._finished()
    [group] = admitted(d)
    assert not d._finished()  # in flight
    d._settle(group, d._judge(group.items, 200, good_answer(group.items)))
    assert d._finished()


def test_answers_are_written_once_a_loop_tick_and_the_last_one_wakes_the_run(tmp_path):
    d = dispatcher(tmp_path, n=2, concurrency=2, prompts_per_request=1)
    on_disk = []

    async def answered_in_turn():
        d._loop, d._wake = asyncio.get_running_loop(), asyncio.Event()
        sent = {}
        d._send = lambda group: sent.setdefault(group.items[0].record.key, group)
        d._admit()
        for key in ("r0", "r1"):  # each answered by the server in its own loop tick
            d._reply(sent[key], (200, json.dumps(good_answer(sent[key].items)).encode()))
            for _ in range(5):  # its flush runs on the next tick
                await asyncio.sleep(0)
            on_disk.append(([head["k"] for _, head, _ in entries(d._ledger.path)], d._wake.is_set()))

    asyncio.run(answered_in_turn())
    assert on_disk == [(["r0"], False), (["r0", "r1"], True)]  # r1 still in flight: no wake before the last


def test_answers_settled_in_one_loop_tick_are_written_in_one_flush(tmp_path):
    d = dispatcher(tmp_path, n=3, concurrency=3, prompts_per_request=1)
    flushes, flush = [], d._ledger.flush
    d._ledger.flush = lambda: (flushes.append(d._ledger.finished), flush())

    async def answered_together():
        d._loop, d._wake = asyncio.get_running_loop(), asyncio.Event()
        sent = []
        d._send = sent.append
        d._admit()
        for group in sent:  # the three answers arrive in one tick
            d._reply(group, (200, json.dumps(good_answer(group.items)).encode()))
        await asyncio.sleep(0)

    asyncio.run(answered_together())
    assert flushes == [3]
