"""Rank 0 publishes its address in the job folder, the others wait for it (slurm/rendezvous.py)."""
import json
import threading
import time

import pytest

from fleetgen.slurm.environment import RankEnvironment
from fleetgen.slurm.rendezvous import rendezvous


def fake_env(rank: int, world_size: int = 3, restart_count: int = 0) -> RankEnvironment:
    return RankEnvironment(global_rank=rank, local_rank=rank, world_size=world_size, node_rank=0, num_nodes=1,
                           hostnames=("127.0.0.1",), job_id="77", first_host="127.0.0.1", cluster="local",
                           restart_count=restart_count)


def test_rank_0_publishes_its_address_atomically(tmp_path):
    init_method = rendezvous(tmp_path / "job", fake_env(0), timeout_s=1)
    host, port = init_method.removeprefix("tcp://").split(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536
    assert json.loads((tmp_path / "job" / "rendezvous-77.json").read_text()) == {
        "init_method": init_method, "restart_count": 0}
    assert [p.name for p in (tmp_path / "job").iterdir()] == ["rendezvous-77.json"]  # no temp file left


def test_a_rank_waits_until_rank_0_publishes(tmp_path):
    publisher = threading.Timer(0.5, rendezvous, args=(tmp_path, fake_env(0), 1))
    publisher.start()
    init_method = rendezvous(tmp_path, fake_env(1), timeout_s=10)
    publisher.join()
    assert init_method == json.loads((tmp_path / "rendezvous-77.json").read_text())["init_method"]


def test_a_rank_waits_for_rank_0_and_gives_up_with_a_clear_error(tmp_path):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank 2 of job 77: .*rendezvous-77.json was not written within 0.3"):
        rendezvous(tmp_path, fake_env(2), timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 5


def test_an_earlier_attempts_file_is_not_used(tmp_path):
    rendezvous(tmp_path, fake_env(0, restart_count=0), timeout_s=1)
    with pytest.raises(TimeoutError, match="only an earlier attempt's file found"):
        rendezvous(tmp_path, fake_env(1, restart_count=1), timeout_s=0.3)
