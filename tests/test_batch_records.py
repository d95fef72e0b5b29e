import json

import pytest

from fleetgen.launcher.batch import _keep_finished, _requests, read_records
from fleetgen.launcher.errors import LaunchError
from fleetgen.conf.schema import Generation


def write(tmp_path, *lines):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) if not isinstance(line, str) else line for line in lines) + "\n")
    return path


def test_records_take_defaults_and_their_own_fields(tmp_path):
    path = write(tmp_path, {"prompt": "a"}, "", {"id": "x", "prompt": "b", "tokens_to_generate": 3})
    first, second = read_records(path, Generation(tokens_to_generate=7))
    assert (first.id, first.line, first.params["tokens_to_generate"]) == (1, 1, 7)
    assert (second.id, second.line, second.params["tokens_to_generate"]) == ("x", 3, 3)


def test_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(LaunchError, match="no records"):
        read_records(write(tmp_path, ""), Generation())


def test_requests_group_consecutive_records_with_equal_parameters(tmp_path):
    path = write(tmp_path, *({"prompt": str(i)} for i in range(5)), {"prompt": "t", "temperature": 0.5},
                 {"prompt": "u"})
    chunks = list(_requests(read_records(path, Generation()), per_request=2))
    assert [[index for index, _ in chunk] for chunk in chunks] == [[0, 1], [2, 3], [4], [5], [6]]


def test_an_interrupted_runs_results_are_kept_except_a_cut_line(tmp_path):
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text('{"id": 1, "completion": "a"}\n{"id": "two", "completion": "b"}\n{"id": 3, "compl')
    assert _keep_finished(partial) == {"1", '"two"'}
    assert partial.read_text().count("\n") == 2 and partial.read_text().endswith("}\n")
