"""Prefix-aware dispatch: the hashes that name a prompt's prefixes, the table of their owners, the park of groups
waiting for a busy owner, and run() against stand-in servers that count their prefix-cache hits. Fast: no model."""
import random
import threading
from collections import Counter
from types import SimpleNamespace

from fleetgen.launcher.batch.affinity import CHUNK_CHARS, Parked, PrefixTable, prefix_keys
from tests.batch_stub import read_jsonl
from tests.test_batch_dispatch import go

pytest_plugins = ["tests.batch_stub"]  # the stubs fixture


def replica(state="healthy"):
    return SimpleNamespace(state=state)


def test_prefix_keys_chain_each_chunk_to_the_ones_before_and_end_with_the_whole_text():
    shared = "s" * (2 * CHUNK_CHARS)
    a, b = prefix_keys(shared + "tail a"), prefix_keys(shared + "tail b")
    assert len(a) == len(b) == 3 and a[:2] == b[:2] and a[2] != b[2]  # two chunks, then the whole text
    assert prefix_keys(shared + "tail a") == a
    # the same chunk after another beginning is another prefix
    assert prefix_keys("t" * CHUNK_CHARS + "s" * CHUNK_CHARS)[1] != a[1]
    assert prefix_keys("x" * 63) == [] and len(prefix_keys("x" * 64)) == 1  # too short to follow; whole text only
    assert len(prefix_keys("x" * CHUNK_CHARS)) == 2
    # chunks of 256 characters (the README's figure), from the first character on
    assert [len(prefix_keys("x" * n)) for n in (255, 256, 511, 512)] == [1, 2, 2, 3]
    assert prefix_keys("a" + shared[1:])[0] != prefix_keys("b" + shared[1:])[0]


def test_the_owner_is_the_one_of_the_longest_known_prefix_and_must_be_healthy():
    table, x, y = PrefixTable(), replica(), replica()
    long_, short = prefix_keys("p" * 600), prefix_keys("p" * 300)
    table.claim(short, x)
    assert table.owner(long_) is x  # shares the first chunk
    table.claim(long_, y)
    assert table.owner(long_) is y and table.owner(short) is x  # a healthy owner keeps what it has
    assert table.owner(prefix_keys("q" * 600)) is None
    x.state = "failed"
    assert table.owner(short) is None  # never sent to a lost replica
    table.claim(short, y)
    assert table.owner(short) is y  # a lost owner's prefixes go to the next one to compute them


def test_the_table_remembers_65536_prefixes_and_the_park_holds_64_groups():  # the README's figures
    table, x = PrefixTable(), replica()
    table.claim(list(range(65_537)), x)
    assert len(table) == 65_536 and table.owner([0]) is None and table.owner([1]) is x
    park = Parked()
    for n in range(64):
        assert not park.full
        park.park([n], [], x)
    assert park.full


def test_the_table_forgets_the_least_recently_used_prefixes_first():
    table, x = PrefixTable(most=3), replica()
    keys = [[k] for k in range(5)]
    for key in keys[:3]:
        table.claim(key, x)
    table.claim(keys[0], x)  # used again: now the newest
    table.claim(keys[3], x)
    assert len(table) == 3 and table.owner(keys[1]) is None and table.owner(keys[0]) is x
    assert table.owner(keys[3]) is x


def test_parked_groups_come_back_to_their_owner_or_oldest_first_each_exactly_once():
    rng, owners = random.Random(7), [replica() for _ in range(4)]
    park, model, given = Parked(most=16), [], 0  # model: the (group, owner) pairs parked, oldest first
    taken = []
    for _ in range(5000):
        if not park.full and rng.random() < 0.5:
            group, owner = [given], rng.choice(owners)
            given += 1
            park.park(group, [given], owner)
            model.append((group, owner))
        elif rng.random() < 0.5:
            owner = rng.choice(owners)
            got = park.take_for(owner)
            mine = [pair for pair in model if pair[1] is owner]
            assert (got and got[0]) == (mine[0][0] if mine else None)
            if mine:
                model.remove(mine[0])
                taken.append(got[0][0])
        elif rng.random() < 0.9:
            got = park.take_oldest()
            assert (got and got[0]) == (model[0][0] if model else None)
            if model:
                taken.append(model.pop(0)[0][0])
        else:
            owner = rng.choice(owners)
            mine = [pair[0] for pair in model if pair[1] is owner]
            assert park.take_all_for(owner) == mine
            model = [pair for pair in model if pair[1] is not owner]
            taken += [group[0] for group in mine]
        assert len(park) == len(model) and park.full == (len(model) >= 16)
        # entries held, taken ones included, counted right; taken ones do not pile up past the park's size
        assert park._stored == len(park._all) + sum(len(queue) for queue in park._by_owner.values())
        assert park._stored <= 2 * len(model) + 16
    taken += [group[0] for group, _ in model]
    assert sorted(taken) == list(range(given))


def long_prompts(prefixes: int, per_prefix: int) -> list[dict]:
    """Records that share one of `prefixes` long beginnings (a system prompt and examples), interleaved."""
    heads = [f"system prompt {p}: " + f"example {p} " * 60 for p in range(prefixes)]
    return [{"id": f"r{i}", "prompt": heads[i % prefixes] + f"question {i}"} for i in range(prefixes * per_prefix)]


def where_each_went(servers) -> dict[str, Counter]:
    """prompt -> how many of its requests each server answered."""
    seen: dict[str, Counter] = {}
    for n, server in enumerate(servers):
        for prompt in server.prompts:
            seen.setdefault(prompt, Counter())[n] += 1
    return seen


def test_records_sharing_a_prefix_go_to_the_replica_that_holds_it(tmp_path, stubs):
    servers = [stubs(delay_s=0.005) for _ in range(4)]
    summary = go(tmp_path, long_prompts(4, 40), servers, concurrency=2, prompts_per_request=1)
    assert summary.complete and summary.audit["ok"]
    by_prefix: dict[str, Counter] = {}
    for prompt, counts in where_each_went(servers).items():
        by_prefix.setdefault(prompt[:20], Counter()).update(counts)
    for head, counts in by_prefix.items():  # least-outstanding alone spreads each prefix over all four
        assert max(counts.values()) >= 0.85 * sum(counts.values()), (head, counts)
    assert all(server.requests > 0 for server in servers)
    assert summary.prompt_tokens_reused == sum(s.reused_tokens for s in servers) > 0
    assert sum(r["reused_tokens"] for r in summary.servers) == summary.prompt_tokens_reused
    assert summary.prompt_tokens_reused > 0.8 * summary.prompt_tokens


def test_one_prefix_for_every_record_still_keeps_every_replica_busy(tmp_path, stubs):
    servers = [stubs(delay_s=0.01) for _ in range(4)]
    summary = go(tmp_path, long_prompts(1, 400), servers, concurrency=2, prompts_per_request=1)
    assert summary.complete and summary.audit["ok"]
    answered = [server.requests for server in servers]
    assert min(answered) >= 0.1 * sum(answered), answered  # the owner's overflow goes to the others


def test_a_records_samples_go_to_one_replica(tmp_path, stubs):
    servers = [stubs(delay_s=0.005) for _ in range(4)]
    rows = [{"id": f"r{i}", "prompt": f"record {i} " + "context " * 20} for i in range(24)]
    summary = go(tmp_path, rows, servers, concurrency=2, prompts_per_request=2, samples=8,
                 generation={"greedy": False})
    assert summary.complete and summary.done == 24 * 8
    spread = where_each_went(servers)  # 4 requests a record
    together = sum(max(counts.values()) for counts in spread.values())
    assert together >= 0.85 * 24 * 8, spread  # least-outstanding alone spreads a record's requests
    assert summary.prompt_tokens_reused == sum(s.reused_tokens for s in servers)


def test_a_lost_owners_records_and_parked_work_finish_on_the_others(tmp_path, stubs):
    servers = [stubs(delay_s=0.01) for _ in range(3)]
    threading.Timer(0.3, lambda: setattr(servers[0], "down", True)).start()
    rows = long_prompts(3, 60)
    summary = go(tmp_path, rows, servers, concurrency=2, prompts_per_request=1)
    assert summary.complete and summary.failed == 0 and summary.audit["ok"]
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [row["id"] for row in rows]
    assert [lost["url"] for lost in summary.lost_replicas] == [servers[0].url]

