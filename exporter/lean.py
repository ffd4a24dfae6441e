"""The ingest listener's HTTP/1.1 server: httptools' parser (llhttp, Node.js's) under an asyncio
Protocol, answering with plain `Request`/`Response` data.

Why not aiohttp, which serves the main listener: the ingest port takes providers' callbacks at
campaign rates, and there aiohttp's own machinery (its request, response, payload and router
objects, about 100 us a request) cost as much as everything the exporter does with a callback.
This server is what a webhook needs and nothing else (bench/callbacks.py measures the two): a
`Content-Length` body, keep-alive and pipelining answered in order, no chunked bodies (411), no
upgrades. llhttp is strict about framing (two lengths, a length beside chunked, a space before a
colon are all errors), and every framing error is answered 400 and closes the connection, so no
request hides in another's body.

The limits are the web module's: headers within HEADER_TIMEOUT (and idle connections closed after
as long), a declared body within BODY_TIMEOUT (408), bodies up to MAX_BODY (413), headers up to
MAX_HEADERS bytes (431).
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import httptools

from exporter.routing import Request, Response, json_response

log = logging.getLogger(__name__)

MAX_HEADERS = 64 * 1024  # bytes of request line and headers
MAX_QUEUED = 16  # pipelined requests parsed ahead of their answers before reading pauses
# the loop's time a pass gives to starting ingest requests before the rest has run again
TURN_BUDGET = 0.001

# what the server hands a request: the answer, or the refusal it already made (411, 413), which
# the handler may count before it is sent
Serve = Callable[[Request, Response | None], Awaitable[Response]]

_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Date:
    """The Date header, made once a second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = email.utils.formatdate(second, usegmt=True).encode()
        return cls.value


class Headers(dict):
    """Request headers by lower-cased name; looked up in any case (as aiohttp's are)."""

    __slots__ = ()

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


def encode(
    response: Response, extra: tuple[tuple[str, str], ...], close: bool, head: bool = False
) -> bytes:
    """The answer's bytes; to a HEAD, its headers only."""
    status = response.status
    lines = [
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n"
        % (
            status,
            _REASONS.get(status, "Unknown").encode(),
            response.content_type.encode("latin-1"),
            len(response.body),
            _Date.now(),
        )
    ]
    for name, value in (*response.headers, *extra):
        safe = value.replace("\r", " ").replace("\n", " ")  # never a header split by a value
        lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), safe.encode("latin-1", "replace")))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(response.body)
    return b"".join(lines)


class Turns:
    """Callbacks take turns with everything else on the loop: a request starts while less
    than TURN_BUDGET has passed since the first one that started this turn, and the others
    wait for the next turn, in their order.

    Why: a campaign's burst keeps 64 requests ready at once, and the loop runs every ready
    callback before it looks at its sockets again, so one pass of 50-status deliveries put
    30-45 ms of parsing ahead of a scrape, a poll's answer or a COMMIT's acknowledgements
    (bench/callbacks.py, D7 at 50 per request: /metrics p99 46-63 ms without turns, 18-21 ms
    with, at the same rate within the runs' noise). A turn is one pass of the loop: it ends
    when the callback it scheduled runs, after everything that was ready then."""

    def __init__(self, budget: float = TURN_BUDGET):
        self._budget = budget
        self._since: float | None = None  # when this turn's first request started
        self._started = 0  # requests started this turn
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._again: list[asyncio.Future[None]] = []  # woken and still over: first next turn
        self._turning = False

    def start(self) -> Awaitable[None] | None:
        """None if a request may start now (no coroutine on that path); else what to await
        until it may."""
        turn = self.wait()
        return None if turn is None else self._until_started(turn)

    async def _until_started(self, turn: asyncio.Future[None] | None) -> None:
        while turn is not None:
            await turn
            turn = self.wait(again=True)

    def wait(self, again: bool = False) -> asyncio.Future[None] | None:
        """None if a request may start now; else what to await before asking `again`."""
        behind = bool(self._waiting) and not again  # a newcomer waits behind the waiting
        if self._since is None and not behind:
            self._since = time.perf_counter()  # the turn's first
            self._next_turn()
        elif behind or time.perf_counter() - self._since >= self._budget:
            future = asyncio.get_running_loop().create_future()
            (self._again if again else self._waiting).append(future)
            self._next_turn()
            return future
        self._started += 1
        return None

    def _next_turn(self) -> None:
        if not self._turning:
            self._turning = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        """As many as started last turn, and one more, are woken to start in the next."""
        self._turning = False
        self._since = None
        wake, self._started = self._started + 1, 0
        woken, self._again = self._again, []
        while self._waiting and len(woken) < wake:
            woken.append(self._waiting.popleft())
        for future in woken:
            if not future.done():
                future.set_result(None)
        if self._waiting:
            self._next_turn()


class Connection(asyncio.Protocol):
    """One client connection: parses requests as they come, answers them one at a time in
    their order (a pipelined request waits for the one before it)."""

    def __init__(
        self,
        serve: Serve,
        extra: Callable[[], tuple[tuple[str, str], ...]],
        release: Callable[[], None],
        header_timeout: float,
        body_timeout: float,
        max_body: int,
        turns: Turns | None = None,
    ):
        self._serve = serve
        self._turns = turns
        self._extra = extra
        self._release = release
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._max_body = max_body
        self._parser = httptools.HttpRequestParser(self)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # (request, its refusal, close after): a request of None is an error of the connection's
        # own (400, 431), written as it is
        self._queue: deque[tuple[Request | None, Response | None, bool]] = deque()
        self._busy = False
        self._paused = False
        self._closing = False  # nothing more is read
        self._eof = False
        # the request being parsed
        self._url = b""
        self._headers = Headers()
        self._size = 0
        self._body: list[bytes] = []
        self._length = 0
        self._in_body = False
        self._refusal: Response | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._arm(self._header_timeout, self._idle)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "upgrades are not served here")
        except httptools.HttpParserCallbackError:
            if not self._closing:  # a callback refused the request and closed
                self._fail(400, "the request could not be read")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed request: {_reason(exc)}")
        else:
            if self._in_body and self._timer is None:
                self._arm(self._body_timeout, self._stalled)

    def eof_received(self) -> bool | None:
        """The client sent all it will: what it asked is still answered, then closed."""
        self._closing = True
        if self._busy:
            self._eof = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._disarm()
        self._release()

    def close(self) -> None:
        """The exporter stops: whatever is in flight is dropped, as aiohttp's shutdown does."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # --- httptools' callbacks ---

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = Headers()
        self._size = 0
        self._body = []
        self._length = 0
        self._refusal = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        if key in headers:  # repeated: one value, as RFC 9110 joins them
            text = f"{dict.__getitem__(headers, key)}, {text}"
        dict.__setitem__(headers, key, text)

    def on_headers_complete(self) -> None:
        self._disarm()
        headers = self._headers
        if "upgrade" in headers and "upgrade" in dict.get(headers, "connection", "").lower():
            # llhttp would hand the request over and the rest of the stream as another protocol
            self._fail(400, "upgrades are not served here")
            raise _Stop
        if "chunked" in dict.get(headers, "transfer-encoding", "").lower():
            self._refusal = json_response(411, {"error": "send the body with a Content-Length"})
        else:
            declared = dict.get(headers, "content-length")
            length = int(declared) if declared else 0  # llhttp has checked it is digits
            if length > self._max_body:
                self._refusal = json_response(
                    413, {"error": f"body of {length} bytes is over the limit of {self._max_body}"}
                )
            elif length and dict.get(headers, "expect", "").lower() == "100-continue":
                assert self._transport is not None
                self._transport.write(_CONTINUE)
        if self._refusal is not None:  # answered now; the body is never read
            self._enqueue(close=True)
            raise _Stop
        self._in_body = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        self._enqueue(close=not self._parser.should_keep_alive())

    # --- the requests ---

    def _enqueue(self, close: bool) -> None:
        parsed = httptools.parse_url(self._url)
        path = parsed.path.decode("latin-1")
        if "%" in path:
            path = unquote(path, errors="replace")
        request = Request(
            self._parser.get_method().decode("ascii"),
            path,
            self._headers,
            b"".join(self._body),
            parsed.query.decode("latin-1") if parsed.query else "",
        )
        self._push(request, self._refusal, close)

    def _push(self, request: Request | None, refusal: Response | None, close: bool) -> None:
        self._queue.append((request, refusal, close))
        if close:
            self._closing = True  # nothing after this request is read
        if not self._busy:
            self._busy = True
            self._loop.create_task(self._answer_all())
        elif len(self._queue) >= MAX_QUEUED and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()

    async def _answer_all(self) -> None:
        transport = self._transport
        assert transport is not None
        while self._queue:
            request, refusal, close = self._queue.popleft()
            if request is None:
                assert refusal is not None
                response = refusal
            else:
                if self._turns is not None and (turn := self._turns.start()) is not None:
                    await turn
                try:
                    response = await self._serve(request, refusal)
                except Exception:
                    log.exception("answering %s %s failed", request.method, request.path)
                    response = json_response(
                        500, {"error": "internal error; see the exporter's log"}
                    )
            if transport.is_closing():
                return
            head = request is not None and request.method == "HEAD"
            transport.write(encode(response, self._extra(), close, head))
            if close:
                transport.close()
                return
            if self._paused and len(self._queue) < MAX_QUEUED // 2:
                self._paused = False
                transport.resume_reading()
        self._busy = False
        if self._eof:
            transport.close()
        elif not self._in_body and self._timer is None:
            self._arm(self._header_timeout, self._idle)

    def _fail(self, status: int, message: str) -> None:
        """A request that cannot be read: its error, after the answers before it, then close."""
        self._disarm()
        self._in_body = False
        self._push(None, json_response(status, {"error": message}), True)

    def _grow(self, size: int) -> None:
        self._size += size
        if self._size > MAX_HEADERS:
            self._fail(431, f"the request line and headers are over {MAX_HEADERS} bytes")
            raise _Stop

    # --- timers ---

    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, then)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        """No (complete) request headers within the header timeout: closed without an answer,
        as aiohttp closes an idle keep-alive connection."""
        self._timer = None
        if not self._busy and self._transport is not None:
            self._closing = True
            self._transport.close()

    def _stalled(self) -> None:
        """Handed to the handler as a refusal, so it is counted like any answer."""
        self._timer = None
        self._in_body = False
        self._refusal = json_response(
            408, {"error": f"the body did not arrive within {self._body_timeout:g}s of its headers"}
        )
        self._enqueue(close=True)


class _Stop(Exception):
    """Raised from a parser callback to stop parsing: llhttp reports it as a callback error."""


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return "".join(c if c.isprintable() else "?" for c in text)[:120]
