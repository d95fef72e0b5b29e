"""The dispatcher's HTTP client (launcher/batch/http.py) against small asyncio servers of the test's own: kept-alive
connections, one per request in flight, at most DIALS connecting at once, and each way a request fails."""
import asyncio
import json
import re
import socket

import pytest

from fleetgen.launcher.batch import http
from fleetgen.launcher.batch.http import Pool


def answer(body: dict, *headers: str) -> bytes:
    data = json.dumps(body).encode()
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(data)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    return head, await reader.readexactly(int(length.group(1)) if length else 0)


def run(scenario):
    """scenario(url, connections) with a server whose handler is scenario.handler; connections: one list of
    requests' heads for each connection the server accepted."""
    async def main():
        connections = []

        async def handle(reader, writer):
            heads = []
            connections.append(heads)
            await scenario.handler(reader, writer, heads)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            return await scenario(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", connections)
        finally:
            server.close()

    return asyncio.run(main())


def test_requests_go_one_after_another_over_one_kept_alive_connection_with_the_token():
    async def scenario(url, connections):
        pool = Pool(url, {"Authorization": "Bearer secret"})
        answers = [await pool.fetch("PUT", "/generate", json.dumps({"n": n}).encode(), 10) for n in range(3)]
        pool.close()
        return answers, connections

    async def handler(reader, writer, heads):
        while True:
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            heads.append(head)
            writer.write(answer({"got": json.loads(body)["n"]}))

    scenario.handler = handler
    answers, connections = run(scenario)
    assert [(status, json.loads(body)) for status, body in answers] == [(200, {"got": n}) for n in range(3)]
    [heads] = connections  # one connection, kept alive
    assert len(heads) == 3 and all(h.startswith(b"PUT /generate HTTP/1.1\r\n") for h in heads)
    assert b"Authorization: Bearer secret" in heads[0] and b"Content-Type: application/json" in heads[0]


def test_each_request_in_flight_has_its_own_connection_and_at_most_DIALS_connect_at_once(monkeypatch):
    dialing, dial = [], http.Connection.dial

    def counted(connection, host, port):
        dial(connection, host, port)
        dialing.append(connection._pool._dialing)

    monkeypatch.setattr(http.Connection, "dial", counted)
    arrived, gate = [], asyncio.Event

    async def scenario(url, connections):
        scenario.gate = gate()
        pool = Pool(url, {})
        answers = await asyncio.gather(*(pool.fetch("GET", f"/{n}", None, 10) for n in range(8)))
        pool.close()
        return answers, connections

    async def handler(reader, writer, heads):
        head, _ = await read_request(reader)
        heads.append(head)
        arrived.append(head)
        if len(arrived) == 8:  # answered only once all eight are in: each needs a connection of its own
            scenario.gate.set()
        await scenario.gate.wait()
        writer.write(answer({"path": head.split()[1].decode()}))

    scenario.handler = handler
    answers, connections = run(scenario)
    assert sorted(json.loads(body)["path"] for _, body in answers) == [f"/{n}" for n in range(8)]
    assert len(connections) == 8 and max(dialing) == http.DIALS == 2 and len(dialing) == 8


def test_a_request_without_an_answer_in_time_fails_with_a_timeout_and_its_connection_is_closed():
    async def scenario(url, connections):
        pool = Pool(url, {})
        with pytest.raises(TimeoutError):
            await pool.fetch("PUT", "/generate", b"{}", 0.2)
        return await scenario.closed

    async def handler(reader, writer, heads):
        await read_request(reader)
        scenario.closed.set_result(await reader.read() == b"")  # nothing more: the client closed it

    scenario.handler = handler

    async def with_future(url, connections):
        scenario.closed = asyncio.get_running_loop().create_future()
        return await scenario(url, connections)

    with_future.handler = handler
    assert run(with_future) is True


@pytest.mark.parametrize("server_does, error", [
    ("close", ConnectionError),  # a lost connection (the server crashed on the request)
    ("garbage", ConnectionError),  # not an HTTP/1.1 answer
])
def test_a_lost_connection_and_an_answer_that_is_not_http_are_connection_errors(server_does, error):
    async def scenario(url, connections):
        with pytest.raises(error) as raised:
            await Pool(url, {}).fetch("PUT", "/generate", b"{}", 10)
        return raised.value

    async def handler(reader, writer, heads):
        await read_request(reader)
        if server_does == "garbage":
            writer.write(b"hello there\r\n\r\n")
            await writer.drain()
        writer.close()

    scenario.handler = handler
    assert isinstance(run(scenario), OSError)  # what the dispatcher counts against the server


def test_a_refused_connect_is_an_oserror():
    closed = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()

    async def refused():
        with pytest.raises(OSError):
            await Pool(url, {}).fetch("GET", "/health", None, 10)

    asyncio.run(refused())


def test_an_answer_with_connection_close_is_not_reused():
    async def scenario(url, connections):
        pool = Pool(url, {})
        for _ in range(2):
            assert (await pool.fetch("GET", "/health", None, 10))[0] == 200
        return len(connections)

    async def handler(reader, writer, heads):
        await read_request(reader)
        writer.write(answer({"status": "ready"}, "Connection: close"))
        await writer.drain()
        writer.close()

    scenario.handler = handler
    assert run(scenario) == 2


def test_closing_the_pool_leaves_its_requests_unanswered():
    async def scenario(url, connections):
        pool, replies = Pool(url, {}), []
        pool.request("PUT", "/generate", b"{}", 10, lambda key, outcome: replies.append((key, outcome)), "a")
        await scenario.arrived.wait()
        pool.close()
        scenario.release.set()
        for _ in range(20):
            await asyncio.sleep(0)
        return replies

    async def handler(reader, writer, heads):
        await read_request(reader)
        scenario.arrived.set()
        await scenario.release.wait()
        writer.write(answer({}))

    scenario.handler = handler

    async def with_events(url, connections):
        scenario.arrived, scenario.release = asyncio.Event(), asyncio.Event()
        return await scenario(url, connections)

    with_events.handler = handler
    assert run(with_events) == []


def test_only_plain_http_urls_are_taken():
    with pytest.raises(ValueError, match="not a plain http://host:port URL"):
        Pool("https://node-3:5000", {})
