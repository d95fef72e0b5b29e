"""The ledger, the merge into input order and the audit, without servers."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fleetgen.launcher.batch.finalise import audit, finalise
from fleetgen.launcher.batch import ledger as ledger_module
from fleetgen.launcher.batch.ledger import Bits, Ledger, check_header, ledger_path, make_header, repair
from fleetgen.launcher.errors import LaunchError
from tests.batch_stub import read_jsonl

HEADER = make_header("f" * 32, {"samples": 2}, items=20)


def fill(path, positions, header=HEADER):
    ledger = Ledger(path, header, samples=2)
    added = [ledger.add(i, s, f"k{i}", ok=(i % 5 != 3), record={"id": f"k{i}", "sample": s}, tokens=(2, 3))
             for i, s in positions]
    ledger.close()
    return ledger, added


def test_an_item_is_recorded_once_and_replayed(tmp_path):
    path = tmp_path / "new" / "folder" / "out.ledger.jsonl"
    ledger, added = fill(path, [(0, 0), (0, 1), (0, 0), (4, 1)])
    assert added == [True, True, False, True] and ledger.cut_bytes == 0
    again = Ledger(path, HEADER, samples=2)
    assert (again.finished, again.failed, again.completion_tokens) == (3, 0, 9)
    assert again.done.positions() == [0, 1, 9]
    assert not again.add(4, 1, "k4", True, {}) and again.add(3, 0, "k3", False, {"id": "k3"})
    assert (again.finished, again.failed, again.prompt_tokens, again.completion_tokens) == (4, 1, 6, 9)
    again.close()
    assert not again.add(5, 0, "k5", True, {})  # closed: a straggling answer is dropped


@pytest.mark.parametrize("tail", [b'{"i": 9, "s": 0, "k": "k9", "ok": tr', b'{"i": 9, "s": 0}', b"\0\0\0\0\n\0\0",
                                  b'{"i": 9, "s": 0, "k": "k9", "ok": true, "tokens": [1, 1], "record": {"id": "k}\n',
                                  b'{"i": 9, "s": 0, "k": "k9", "ok": tr, "record": {}}\n',
                                  b'{"i": 9, "s": 0, "record": {}}\n'],
                         ids=["torn-head", "no-record", "zeros", "torn-record", "garbled-head", "foreign-entry"])
def test_a_torn_tail_is_cut_and_its_item_redone(tmp_path, tail):
    path = tmp_path / "out.ledger.jsonl"
    fill(path, [(0, 0), (1, 1)])
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    ledger = Ledger(path, HEADER, samples=2)
    assert ledger.cut_bytes == len(tail) and ledger.finished == 2
    assert ledger.add(9, 0, "k9", True, {"id": "k9", "sample": 0})
    ledger.close()
    assert path.read_bytes().startswith(whole) and len(path.read_text().splitlines()) == 4
    again = Ledger(path, HEADER, samples=2)  # left behind, the tail would now be damage before a whole entry
    assert (again.cut_bytes, again.finished, again.done.positions()) == (0, 3, [0, 3, 18])
    again.close()


READER = """import sys
for _ in sys.stdin:
    with open(sys.argv[1], "rb") as f:
        print(len(f.read().splitlines()) - 1, flush=True)
"""


def test_an_item_is_on_disk_for_another_process_once_add_returns(tmp_path):
    path = tmp_path / "out.ledger.jsonl"
    ledger = Ledger(path, HEADER, samples=2)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        for i in range(5):
            ledger.add(i, 0, f"k{i}", True, {"id": f"k{i}", "sample": 0}, tokens=(2, 3))
            ledger.flush()  # what the dispatcher does once an event-loop tick, before it reports anything done
            reader.stdin.write("read\n")
            reader.stdin.flush()
            seen.append(int(reader.stdout.readline()))
        assert seen == [1, 2, 3, 4, 5]  # the ledger is still open: each flush took its entries out of Python
    finally:
        ledger.close()
        reader.stdin.close()
        reader.wait(10)


def test_the_ledger_is_synced_every_few_seconds_and_on_demand(tmp_path, monkeypatch):
    clock, fsyncs = [100.0], []
    monkeypatch.setattr(ledger_module.time, "monotonic", lambda: clock[0])
    ledger = Ledger(tmp_path / "out.ledger.jsonl", HEADER, samples=2)
    monkeypatch.setattr(ledger_module.os, "fsync", fsyncs.append)
    synced = []
    for i, at in enumerate([102.0, 102.1, 103.5, 104.2]):
        clock[0] = at
        ledger.add(i, 0, f"k{i}", True, {})
        ledger.flush()
        synced.append(len(fsyncs))
    assert synced == [0, 1, 1, 2]  # at 102.1 and 104.2: more than FSYNC_EVERY_S = 2 s after the one before
    ledger.sync()
    assert len(fsyncs) == 3
    ledger.close()
    ledger.sync()  # closed: nothing to sync, and no error
    assert len(fsyncs) == 4


def test_paths_and_the_size_of_the_finished_bits():
    assert ledger_path(Path("runs/out.jsonl")) == Path("runs/out.jsonl.ledger.jsonl")
    assert Bits(10**6)._bytes.nbytes == 125_000 and Bits(9)._bytes.nbytes == 2


class Recording:
    """The ledger's file, recording the calls that move its bytes towards the disk into events."""

    def __init__(self, file, events):
        self._file, self._events = file, events

    def write(self, data):
        self._events.append("write")
        return self._file.write(data)

    def flush(self):
        self._events.append("flush")
        self._file.flush()

    def __getattr__(self, name):
        return getattr(self._file, name)


@pytest.mark.parametrize("every_s", [0.0, 3600.0], ids=["sync-each-add", "sync-on-close"])
def test_each_fsync_follows_a_flush_and_the_ledger_is_synced(tmp_path, monkeypatch, every_s):
    events = []
    real_fsync = ledger_module.os.fsync
    monkeypatch.setattr(ledger_module, "FSYNC_EVERY_S", every_s)
    ledger = Ledger(tmp_path / "out.ledger.jsonl", HEADER, samples=2)
    monkeypatch.setattr(ledger_module.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    ledger._file = Recording(ledger._file, events)
    for i in range(3):
        ledger.add(i, 0, f"k{i}", True, {"id": f"k{i}"})
        ledger.flush()
        assert events[events.index("write") + 1] == "flush"  # before flush() returns, before any fsync
        if every_s == 0.0:
            assert events[-2:] == ["flush", "fsync"], events  # the periodic sync: what was written, flushed
        else:
            assert "fsync" not in events
        events.clear()
    ledger._file.write(b"")  # a byte still in Python's buffer is what a sync must flush first
    events.clear()
    ledger.close()
    assert events == ["flush", "fsync"]


@pytest.mark.parametrize("cut", [10, -5], ids=["head-torn", "record-torn"])
def test_damage_before_whole_entries_is_refused(tmp_path, cut):
    path = tmp_path / "out.ledger.jsonl"
    fill(path, [(0, 0), (1, 1)])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:cut] + "\n" + lines[2])
    with pytest.raises(LaunchError, match="line 2: damaged entry"):
        repair(path)


@pytest.mark.parametrize("span, buffered", [(1 << 20, 8192), (3, 2)])  # one bucket; many, spilled often
def test_finalise_writes_input_order_and_audits(tmp_path, monkeypatch, span, buffered):
    from fleetgen.launcher.batch import finalise as merge

    monkeypatch.setattr(merge, "SPAN", span)
    monkeypatch.setattr(merge, "BUFFERED", buffered)
    path, output, errors = tmp_path / "l.jsonl", tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    positions = [(i, s) for i in range(10) for s in range(2)]
    random.Random(3).shuffle(positions)
    fill(path, positions + positions[:4])  # repeats are refused by add()
    result = finalise([path], output, errors, items=20, samples=2)
    ok = read_jsonl(output)
    failed = read_jsonl(errors)
    assert [(r["id"], r["sample"]) for r in ok] == [(f"k{i}", s) for i in range(10) if i % 5 != 3 for s in range(2)]
    assert [r["id"] for r in failed] == ["k3", "k3", "k8", "k8"]
    assert (result.ok, result.output_records, result.error_records, result.repeated_keys) == (True, 16, 4, 0)


def test_finalise_refuses_a_ledger_with_missing_items(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path, [(0, 0)])
    with pytest.raises(RuntimeError, match="items have no entry"):
        finalise([path], tmp_path / "o", tmp_path / "e", items=20, samples=2)
    assert not (tmp_path / "o").exists()


def test_repeated_keys_are_found_across_spilled_buckets(monkeypatch):
    from fleetgen.launcher.batch import keys

    monkeypatch.setattr(keys, "BUFFERED", 3)
    found = keys.DuplicateKeys()
    for key in [*range(500), "7", 7, *range(1000, 1100)]:
        found.add(key)
    suspects = found.suspects()
    assert keys.DuplicateKeys.first_repeat(suspects, [(k, n) for n, k in enumerate([*range(500), "7", 7])]) == \
        (7, 7, 501)


def test_the_duplicate_finder_holds_at_most_4_MiB_of_hashes_and_spills_a_full_bucket(monkeypatch):
    from fleetgen.launcher.batch import keys

    assert keys.BUCKETS * keys.BUFFERED * 8 <= 4 << 20  # whatever the input's length (on a login node too)
    monkeypatch.setattr(keys, "BUFFERED", 2)
    found = keys.DuplicateKeys()
    held = []
    for key in range(300):
        found.add(key)
        held.append(max(len(bucket) for bucket in found._buffers))
    assert max(held) == 1 and found.suspects() == set()  # a bucket's second hash sends both to its file


def test_the_duplicate_finder_spreads_keys_evenly_so_each_sorted_bucket_is_a_64th(monkeypatch):
    from fleetgen.launcher.batch import keys

    monkeypatch.setattr(keys, "BUFFERED", 10**6)  # all held: the buckets can be looked at
    found = keys.DuplicateKeys()
    for key in range(64 * 100):
        found.add(f"r{key}")
    sizes = [len(bucket) for bucket in found._buffers]
    assert len(sizes) == 64 and 50 < min(sizes) and max(sizes) < 150, sizes
    found.suspects()


def test_the_audit_catches_a_repeated_key_and_a_missing_record(tmp_path):
    output, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    output.write_text("".join(json.dumps({"id": i, "sample": 0}) + "\n" for i in [1, 2, 2]))
    errors.write_text(json.dumps({"custom_id": "x"}) + "\n")
    result = audit(output, errors, items=5)
    assert (result.ok, result.repeated_keys, result.output_records, result.error_records) == (False, 1, 3, 1)


def test_a_ledger_of_another_version_or_kind_is_refused(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"not": "a ledger"}\n')
    with pytest.raises(LaunchError, match="ledger version None"):
        check_header(path, HEADER, "hint")
    path.write_text("garbage\n")
    with pytest.raises(LaunchError, match="not a fleetgen ledger"):
        check_header(path, HEADER, "hint")


def test_batched_appends_are_written_in_order_at_flush_and_fsynced_on_the_clock(tmp_path, monkeypatch):
    import fleetgen.launcher.batch.ledger as ledger_module

    clock, fsyncs = [100.0], []
    monkeypatch.setattr(ledger_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ledger_module.os, "fsync", lambda fd: fsyncs.append(fd))
    path = tmp_path / "out.ledger.jsonl"
    ledger = Ledger(path, HEADER, samples=2)
    created = len(fsyncs)
    order = [(3, 1), (0, 0), (7, 0), (2, 1)]
    assert all(ledger.add(i, s, f"k{i}", True, {"id": f"k{i}"}) for i, s in order)
    assert ledger.finished == 4 and ledger.done[7 * 2]  # counted at once: a repeat is refused before the flush
    assert not ledger.add(7, 0, "k7", True, {})
    assert len(path.read_bytes().splitlines()) == 1  # nothing written yet but the header
    ledger.flush()
    heads = [json.loads(line) for line in path.read_bytes().splitlines()[1:]]
    assert [(h["i"], h["s"]) for h in heads] == order
    assert len(fsyncs) == created  # not due yet
    clock[0] += ledger_module.FSYNC_EVERY_S + 0.1
    ledger.add(5, 0, "k5", True, {"id": "k5"})
    ledger.flush()
    ledger.flush()
    assert len(fsyncs) == created + 1  # once per FSYNC_EVERY_S, however many flushes
    ledger.add(6, 0, "k6", True, {"id": "k6"})
    ledger.close()
    assert len(fsyncs) == created + 2  # and on close, with the last lines written
    assert [json.loads(line)["i"] for line in path.read_bytes().splitlines()[1:]] == [3, 0, 7, 2, 5, 6]


def test_a_ledger_of_another_input_or_settings_is_refused(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path, [(0, 0)])
    check_header(path, HEADER, "hint")  # the same run: accepted
    with pytest.raises(LaunchError, match="different input"):
        check_header(path, make_header("e" * 32, {"samples": 2}, items=20), "hint")
    with pytest.raises(LaunchError, match="batch.samples: 2 → 3"):
        check_header(path, make_header("f" * 32, {"samples": 3}, items=20), "hint")
    with pytest.raises(LaunchError, match="batch.seed: null → 1"):  # a setting only one of them has
        check_header(path, make_header("f" * 32, {"samples": 2, "seed": 1}, items=20), "hint")


def test_seeds_are_stable_distinct_per_key_and_within_what_the_server_accepts():
    from fleetgen.launcher.batch.keys import base_seed

    # a resumed run must seed its samples as the first did: the values are pinned, not only their properties
    assert [base_seed(0, "r1"), base_seed(11, 1), base_seed(11, "1")] == \
        [1530363106073631340, 731616167769418490, 4277640504367129270]
    seeds = [base_seed(3, i) for i in range(200)]
    assert max(seeds) < 2**62 and max(seeds) > 2**61  # 62 bits: room for the sentences' offsets below 2**63


def test_lines_waiting_past_the_most_are_written_before_the_ticks_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "PENDING_MOST", 300)  # a burst of answers in one loop tick is not held whole
    path = tmp_path / "out.ledger.jsonl"
    ledger = Ledger(path, HEADER, samples=2)
    on_disk = []
    for i in range(4):
        ledger.add(i, 0, f"k{i}", True, {"id": f"k{i}", "text": "x" * 100})
        on_disk.append(len(path.read_bytes().splitlines()) - 1)
    assert on_disk == [0, 2, 2, 4]  # each 170 bytes: written (two in one write) once more than 300 waited
    ledger.flush()
    assert len(path.read_bytes().splitlines()) - 1 == 4
    ledger.close()
