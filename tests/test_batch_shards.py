"""batch.shards: several drivers over one input, each with its own records, replicas and ledger, merged into one
output audited as one; drivers killed at random are started again and nothing is lost or doubled."""
import random
import signal
import threading
import time

import psutil
import pytest

from fleetgen.launcher.batch import prepare, run
from fleetgen.launcher.errors import LaunchError
from tests.batch_stub import StubServer, batch_config, read_jsonl, write_jsonl

SAMPLED = {"greedy": False, "temperature": 1.0, "tokens_to_generate": 3}


@pytest.fixture
def servers():
    stubs = [StubServer() for _ in range(4)]
    yield stubs
    for stub in stubs:
        stub.close()


def plan_of(tmp_path, records: int, name="out.jsonl", **batch):
    path = tmp_path / "in.jsonl"
    if not path.exists():
        write_jsonl(path, [{"id": f"r{i}", "prompt": f"record {i}", "topic": i % 7} for i in range(records)])
    cfg = batch_config(path, tmp_path / name, generation=SAMPLED, samples=2, seed=3, **batch)
    cfg.parallel.replicas = 4
    return prepare(cfg)


def check_exactly_once(tmp_path, records: int, name="out.jsonl"):
    out = read_jsonl(tmp_path / name)
    assert [(r["id"], r["sample"]) for r in out] == [(f"r{i}", j) for i in range(records) for j in range(2)]
    return out


def test_shards_give_the_one_drivers_output(tmp_path, servers):
    urls = [s.url for s in servers]
    one = run(plan_of(tmp_path, 300, "one.jsonl"), urls, None)
    three = run(plan_of(tmp_path, 300, "three.jsonl", shards=3), urls, None)
    assert one.complete and three.complete and three.audit["ok"] and three.audit["output_records"] == 600
    assert check_exactly_once(tmp_path, 300, "three.jsonl") == check_exactly_once(tmp_path, 300, "one.jsonl")
    assert (three.done, three.items) == (600, 600) and len(three.servers) == 4
    assert all(stub.sentences for stub in servers)  # every replica fed
    assert [p.name for p in sorted(tmp_path.glob("three.jsonl.shard-*.ledger.jsonl"))] == [
        f"three.jsonl.shard-{s}-of-3.ledger.jsonl" for s in range(3)]


def drivers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]


def test_drivers_killed_at_random_are_started_again_and_nothing_is_lost_or_doubled(tmp_path, servers):
    for stub in servers:
        stub.delay_s = 0.02  # long enough a run for the kills to land mid-way
    plan = plan_of(tmp_path, 1500, shards=2, max_retries=20, concurrency=2, prompts_per_request=2)
    result = {}
    runner = threading.Thread(target=lambda: result.update(summary=run(plan, [s.url for s in servers], None)))
    runner.start()
    rng, killed = random.Random(7), 0
    while runner.is_alive() and killed < 6:
        time.sleep(rng.uniform(0.3, 1.0))
        alive = drivers()
        if alive:
            rng.choice(alive).send_signal(signal.SIGKILL)
            killed += 1
    runner.join(timeout=600)
    summary = result["summary"]
    assert killed >= 3, "the run ended before the drivers could be killed"
    assert summary.complete and summary.audit["ok"] and summary.audit["repeated_keys"] == 0
    check_exactly_once(tmp_path, 1500)


def test_a_stopped_sharded_batch_resumes_and_a_changed_shard_count_is_refused(tmp_path, servers):
    for stub in servers:
        stub.delay_s = 0.02
    drain = threading.Event()
    plan = plan_of(tmp_path, 800, shards=2, concurrency=1, prompts_per_request=1)
    threading.Timer(1.5, drain.set).start()
    stopped = run(plan, [s.url for s in servers], None, drain)
    assert not stopped.complete and 0 < stopped.done < 1600
    with pytest.raises(LaunchError, match="shards: 2 → 4"):
        plan_of(tmp_path, 800, shards=4)
    for stub in servers:
        stub.delay_s = 0
    resumed = run(plan_of(tmp_path, 800, shards=2), [s.url for s in servers], None)
    assert resumed.complete and resumed.audit["ok"]
    check_exactly_once(tmp_path, 800)


def test_more_shards_than_replicas_is_refused_before_submission(tmp_path):
    cfg = batch_config(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}]), tmp_path / "o.jsonl", shards=2)
    with pytest.raises(LaunchError, match="batch.shards=2: more drivers than parallel.replicas=1"):
        prepare(cfg)
