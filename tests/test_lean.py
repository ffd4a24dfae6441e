"""The ingest listener's HTTP server (exporter.lean) on a real loopback socket, in this process.

Framing attacks, stalled clients and floods against the running exporter's ingest port are in
test_web_security.py; here is what a webhook client relies on: answers in order, keep-alive,
HEAD, 100-continue, the limits and the refusals handed to the handler.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from exporter import lean
from exporter.routing import Request, Response, json_response


class Server:
    """lean.Connection behind a listening socket, with a handler that records what it saw."""

    def __init__(self, *, header_timeout=5.0, body_timeout=5.0, max_body=1000, turns=None):
        self.turns = turns
        self.seen: list[tuple[Request, Response | None]] = []
        self.released = 0
        self.delays: dict[str, float] = {}
        self._limits = (header_timeout, body_timeout, max_body)

    async def serve(self, request: Request, refusal: Response | None) -> Response:
        self.seen.append((request, refusal))
        if refusal is not None:
            return refusal
        if request.path == "/boom":
            raise RuntimeError("a handler's bug")
        await asyncio.sleep(self.delays.get(request.path, 0))
        return Response(200, f"{request.method} {request.path}".encode(), headers=(("X-A", "1"),))

    def release(self) -> None:
        self.released += 1

    async def __aenter__(self) -> Server:
        def connection() -> lean.Connection:
            return lean.Connection(
                self.serve,
                lambda: (("X-Frame-Options", "deny"),),
                self.release,
                *self._limits,
                self.turns,
            )

        self._server = await asyncio.get_running_loop().create_server(connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def exchange(self, data: bytes, *, eof: bool = False, wait: float = 2.0) -> bytes:
        """What the server sends back until it closes (or `wait` passes)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(data)
        if eof:
            writer.write_eof()
        received = b""
        try:
            async with asyncio.timeout(wait):
                while chunk := await reader.read(65536):
                    received += chunk
        except TimeoutError:
            pass
        writer.close()
        return received


def run(scenario):
    return asyncio.run(scenario())


def statuses(received: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path.encode(), extra)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


def test_pipelined_requests_are_answered_in_their_order_even_when_the_first_is_slow():
    async def scenario():
        async with Server() as server:
            server.delays["/slow"] = 0.2
            data = get("/slow") + post("/b", b"{}") + get("/c", b"Connection: close\r\n")
            return await server.exchange(data), server

    received, server = run(scenario)
    assert statuses(received) == [200, 200, 200]
    bodies = re.findall(rb"\r\n\r\n((?:GET|POST) /[a-z]+?)(?=HTTP/1\.1 |$)", received)
    assert bodies == [b"GET /slow", b"POST /b", b"GET /c"]
    assert b"Connection: close" in received.rsplit(b"HTTP/1.1", 1)[1]
    assert server.seen[1][0].body == b"{}"
    assert b"X-Frame-Options: deny" in received and b"X-A: 1" in received
    assert server.released == 1


def test_a_request_is_read_as_plain_data():
    async def scenario():
        async with Server() as server:
            data = (
                b"POST /webhooks/meta/acc%20one?hub.mode=subscribe&x=%41 HTTP/1.1\r\n"
                b"Host: x\r\nX-Hub-Signature-256: sha256=ab\r\nX-Twice: 1\r\nx-twice: 2\r\n"
                b"Content-Length: 3\r\nConnection: close\r\n\r\nabc"
            )
            await server.exchange(data)
            return server.seen[0][0]

    request = run(scenario)
    assert request.method == "POST"
    assert request.path == "/webhooks/meta/acc one"
    assert request.query == "hub.mode=subscribe&x=%41"  # raw: the handler parses it
    assert request.body == b"abc"
    assert request.headers.get("x-hub-signature-256") == "sha256=ab"
    assert request.headers["X-HUB-Signature-256"] == "sha256=ab"
    assert "X-Twice" in request.headers and request.headers.get("X-TWICE") == "1, 2"
    assert request.headers.get("Missing") is None


def test_head_gets_the_headers_and_no_body():
    async def scenario():
        async with Server() as server:
            head = b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
            return await server.exchange(head + get("/g", b"Connection: close\r\n"))

    received = run(scenario)
    assert statuses(received) == [200, 200]
    head, rest = received.split(b"HTTP/1.1 200", 2)[1:]
    assert b"Content-Length: 7\r\n" in head and head.endswith(b"\r\n\r\n")  # "HEAD /h", unsent
    assert rest.endswith(b"\r\n\r\nGET /g")


def test_expect_100_continue_is_answered_before_the_body():
    async def scenario():
        async with Server() as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
            )
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            writer.write(b"{}")
            final = await asyncio.wait_for(reader.readuntil(b"POST /p"), 2)
            writer.close()
            return interim, final

    interim, final = run(scenario)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert statuses(final) == [200]


def test_refusals_reach_the_handler_and_close_the_connection():
    async def scenario():
        async with Server(max_body=10) as server:
            big = await server.exchange(post("/p", b"x" * 11) + get("/hidden"))
            chunked = await server.exchange(
                b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\n\r\n" + get("/hidden")
            )
            return big, chunked, server.seen

    big, chunked, seen = run(scenario)
    assert statuses(big) == [413] and b"over the limit of 10" in big
    assert statuses(chunked) == [411] and b"Content-Length" in chunked
    assert [refusal.status for _, refusal in seen] == [413, 411]  # the handler counts them
    assert all(request.path == "/p" for request, _ in seen)  # /hidden was never read


def test_a_stalled_body_is_refused_408_through_the_handler():
    async def scenario():
        async with Server(body_timeout=0.3) as server:
            received = await server.exchange(
                b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
            )
            return received, server.seen

    received, seen = run(scenario)
    assert statuses(received) == [408] and b"did not arrive within 0.3s" in received
    assert [refusal.status for _, refusal in seen if refusal] == [408]


def test_an_idle_connection_is_closed_without_an_answer():
    async def scenario():
        async with Server(header_timeout=0.3) as server:
            loop = asyncio.get_running_loop()
            began = loop.time()
            received = await server.exchange(get("/a") + b"GET /b HTTP/1.1\r\n", wait=3)
            return received, loop.time() - began, server.released

    received, took, released = run(scenario)
    assert statuses(received) == [200]  # /b's headers never finished: closed, not answered
    assert took < 2, "the idle connection was not closed at the header timeout"
    assert released == 1


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="not-http"),
        pytest.param(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", id="space-before-colon"),
        pytest.param(
            b"POST /p HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
            id="two-lengths",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            id="upgrade",
        ),
    ],
)
def test_a_request_that_cannot_be_read_is_400_and_closed(data):
    async def scenario():
        async with Server() as server:
            return await server.exchange(data + get("/hidden")), server.seen

    received, seen = run(scenario)
    assert statuses(received) == [400], received
    assert b'"error"' in received
    assert not seen


def test_headers_over_the_limit_are_431(monkeypatch):
    monkeypatch.setattr(lean, "MAX_HEADERS", 200)

    async def scenario():
        async with Server() as server:
            return await server.exchange(get("/a", b"X-Big: " + b"y" * 300 + b"\r\n"))

    received = run(scenario)
    assert statuses(received) == [431]


def test_a_failing_handler_is_500_and_the_connection_serves_on():
    async def scenario():
        async with Server() as server:
            return await server.exchange(get("/boom") + get("/after", b"Connection: close\r\n"))

    received = run(scenario)
    assert statuses(received) == [500, 200]


def test_a_half_closed_client_still_gets_its_answers():
    async def scenario():
        async with Server() as server:
            server.delays["/slow"] = 0.1
            return await server.exchange(get("/slow") + get("/next"), eof=True)

    received = run(scenario)
    assert statuses(received) == [200, 200]


def test_http_1_0_closes_after_its_answer():
    async def scenario():
        async with Server() as server:
            return await server.exchange(b"GET /old HTTP/1.0\r\n\r\n", wait=3)

    received = run(scenario)
    assert statuses(received) == [200] and b"Connection: close" in received


def test_answer_bytes_never_split_a_header():
    body = json_response(200, {"ok": True})
    evil = Response(200, b"x", headers=(("X-Evil", "a\r\nSet-Cookie: b"),))
    assert b"Content-Length: %d\r\n" % len(body.body) in lean.encode(body, (), False)
    encoded = lean.encode(evil, (), False)
    assert b"\r\nSet-Cookie" not in encoded and b"X-Evil: a  Set-Cookie: b\r\n" in encoded


def test_a_burst_of_requests_takes_turns_with_the_rest_of_the_loop():
    """Past a turn's budget the rest wait, in their order, while what else is ready runs: a
    scrape that arrives behind ten slow requests is answered after two of them, not ten."""

    def spin(seconds: float) -> None:  # a request's parse, holding the loop
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass

    async def scenario(turns: lean.Turns | None) -> list[int | str]:
        started: list[int | str] = []

        async def request(n: int) -> None:
            if turns is not None and (turn := turns.start()) is not None:  # as lean.Connection
                await turn
            started.append(n)
            spin(0.0006)

        async def scrape() -> None:
            await asyncio.sleep(0)  # its answer comes a pass of the loop after its request
            started.append("scrape")

        tasks = [asyncio.create_task(request(n)) for n in range(10)]
        tasks.append(asyncio.create_task(scrape()))
        await asyncio.gather(*tasks)
        return started

    without = asyncio.run(scenario(None))
    assert without.index("scrape") == 10  # the loop ran every ready request first
    taking_turns = asyncio.run(scenario(lean.Turns(budget=0.001)))
    assert taking_turns.index("scrape") <= 3
    assert [n for n in taking_turns if n != "scrape"] == list(range(10))


def test_requests_that_waited_for_their_turn_are_all_answered_in_order():
    class Counted(lean.Turns):
        waited = 0

        def wait(self, again: bool = False):
            turn = super().wait(again)
            self.waited += turn is not None
            return turn

    turns = Counted(budget=0.0)  # one request a pass of the loop

    async def scenario():
        async with Server(turns=turns) as server:
            pipelined = b"".join(post(f"/r{n}", b"{}") for n in range(5))
            exchanges = [
                server.exchange(pipelined + get("/end", b"Connection: close\r\n")) for _ in range(8)
            ]
            return await asyncio.gather(*exchanges)

    for received in run(scenario):
        assert statuses(received) == [200] * 6
        assert re.findall(rb"(?:GET|POST) (/(?:r\d|end))", received) == [
            b"/r0",
            b"/r1",
            b"/r2",
            b"/r3",
            b"/r4",
            b"/end",
        ]
    assert turns.waited >= 8  # the connections' requests came together and took turns
