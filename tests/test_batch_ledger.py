"""The ledger, the merge into input order and the audit, without servers."""
import json
import random

import pytest

from fleetgen.launcher.batch.finalise import audit, finalise
from fleetgen.launcher.batch.ledger import Ledger, check_header, make_header, repair
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
    path = tmp_path / "out.ledger.jsonl"
    ledger, added = fill(path, [(0, 0), (0, 1), (0, 0), (4, 1)])
    assert added == [True, True, False, True]
    again = Ledger(path, HEADER, samples=2)
    assert (again.finished, again.failed, again.completion_tokens) == (3, 0, 9)
    assert again.done.positions() == [0, 1, 9]
    assert not again.add(4, 1, "k4", True, {}) and again.add(3, 0, "k3", False, {"id": "k3"})
    again.close()
    assert not again.add(5, 0, "k5", True, {})  # closed: a straggling answer is dropped


@pytest.mark.parametrize("tail", [b'{"i": 9, "s": 0, "k": "k9", "ok": tr', b'{"i": 9, "s": 0}', b"\0\0\0\0\n\0\0"])
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


def test_damage_before_whole_entries_is_refused(tmp_path):
    path = tmp_path / "out.ledger.jsonl"
    fill(path, [(0, 0), (1, 1)])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:10] + "\n" + lines[2])
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
    result = finalise(path, output, errors, items=20, samples=2)
    ok = read_jsonl(output)
    failed = read_jsonl(errors)
    assert [(r["id"], r["sample"]) for r in ok] == [(f"k{i}", s) for i in range(10) if i % 5 != 3 for s in range(2)]
    assert [r["id"] for r in failed] == ["k3", "k3", "k8", "k8"]
    assert (result.ok, result.output_records, result.error_records, result.repeated_keys) == (True, 16, 4, 0)


def test_finalise_refuses_a_ledger_with_missing_items(tmp_path):
    path = tmp_path / "l.jsonl"
    fill(path, [(0, 0)])
    with pytest.raises(RuntimeError, match="items have no entry"):
        finalise(path, tmp_path / "o", tmp_path / "e", items=20, samples=2)
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
