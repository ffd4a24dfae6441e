"""One loopback HTTP server that answers any provider's paths with one named fault.

The simulators misbehave per endpoint and only the way their provider would; the fault matrix needs
one server that also breaks the transport (an answer that never comes, one that never ends, one of
50 MB) for every provider at once, so that all the matrix's accounts can point at it. The path
picks the cell: `/<fault>/<provider>/<the provider's own path>`. Stdlib only, like the simulators
(whose kits hold each provider's own answers), and nothing of the exporter is imported: the server
must not share a bug with the code it tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import select
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from simulators import KITS, Simulator

FAULTS = (
    "timeout",
    "refused",
    "auth",
    "not_found",
    "rate_limited",
    "http_500",
    "http_502_html",
    "truncated",
    "wrong_shape",
    "huge",
    "drip",
)
HUGE_BYTES = 50 * 1024 * 1024
DRIP_EVERY = 0.2
DRIP_DECLARED = 10**6  # a Content-Length the drip never reaches (55 hours at 5 bytes a second)
NESTING = 512  # deep, yet within what Python's json (and so the exporter) can parse

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html"

NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
# what each provider answers in its own words (auth, 429 and 404 bodies, a valid answer per
# endpoint, the wrong shape) is in its kit: KITS[provider].faults (simulators/kit.py)


@functools.cache
def _routes(provider: str) -> Simulator:
    """A simulator never started: only its routes are asked."""
    return KITS[provider].simulator(auto=False)


def valid_answer(provider: str, method: str, path: str) -> Any:
    """A documented success answer for the path (the seeds' examples), to cut in half: the
    provider's simulator says which endpoint the path is."""
    kit = KITS[provider]
    endpoint = _routes(provider).endpoint_of(method, path)
    if endpoint not in kit.faults.valid:
        raise AssertionError(f"the {provider} kit has no valid answer for {method} {path}")
    return kit.faults.valid[endpoint]


def truncated(provider: str, method: str, path: str) -> bytes:
    """The valid answer cut in the middle, as a proxy that loses the rest would deliver it."""
    whole = json.dumps(valid_answer(provider, method, path)).encode()
    cut = whole[: len(whole) // 2]
    with contextlib.suppress(ValueError):
        json.loads(cut)
        raise AssertionError(f"cutting the {provider} answer left valid JSON: {cut!r}")
    return cut


def hostile() -> dict[str, Any]:
    """Values that break careless code: json.dumps writes "\\ud800" as the escape, a lone
    surrogate that no UTF-8 encoder accepts."""
    nested: list[Any] = []
    for _ in range(NESTING):
        nested = [nested]
    return {
        "surrogate": "\ud800",
        "surrogates": "a\udfffb\ud83d",
        "long": "x" * 10240,
        "quotes": '"\'`""\'',
        "backslashes": "\\\\ \\u0000 \\",
        "newlines": "one\ntwo\r\nthree\u2028four\x00",
        "nan": ["NaN", "nan", "-Infinity", "Infinity", "1e999", "0x1p3"],
        "negative": [-1, -1.5e308, -0.0, -(2**63)],
        "nested": nested,
    }


def huge_pieces() -> Iterator[bytes]:
    """HUGE_BYTES of a valid JSON array of padding strings, 64 KiB at a time, never held whole."""
    head, tail = b"[", b'""]'
    block = (b'"' + b"x" * 1021 + b'",') * 64
    left = HUGE_BYTES - len(head) - len(tail)
    yield head
    while left >= len(block):
        yield block
        left -= len(block)
    yield b" " * left + tail


class FaultServer:
    """Start it, point accounts at `url(fault, provider)`, stop it; `seen` counts requests per
    cell and `errors` keeps anything the server itself got wrong (a harness bug, not a fault)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self.seen: Counter[tuple[str, str]] = Counter()
        self.paths: dict[tuple[str, str], set[str]] = {}
        self.errors: list[str] = []
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.faults = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="faultserver", daemon=True
        )
        self.port = self._server.server_address[1]

    def url(self, fault: str, provider: str) -> str:
        return f"http://127.0.0.1:{self.port}/{fault}/{provider}"

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self, wait: float = 5.0) -> list[threading.Thread]:
        """Hang up on every connection still hung or dripping; returns handlers that outlived
        `wait` (none, unless the server has a bug). Safe to call twice."""
        if self.stopping.is_set():
            return []
        self.stopping.set()
        if self._thread.is_alive():
            self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(wait)
        with self._lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(wait)
        return [t for t in handlers if t.is_alive()]

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # --- used by the handler threads ---

    def _record(self, fault: str, provider: str, method: str, path: str) -> None:
        with self._lock:
            self.seen[fault, provider] += 1
            self.paths.setdefault((fault, provider), set()).add(f"{method} {path}")

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            self._handlers.add(threading.current_thread())

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
            self._handlers.discard(threading.current_thread())

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # 40 accounts connect at once: the default backlog of 5 drops SYNs, and the client's
    # retransmit a second later would look like the exporter timing out
    request_queue_size = 256
    faults: FaultServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up mid-answer is what half the faults are for; anything else is a
        bug in this server and must fail the test as the harness's, not the exporter's."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError) or self.faults.stopping.is_set():
            return
        self.faults._error(f"{type(exc).__name__}: {exc}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 30  # idle keep-alive connections
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.faults._track(self.connection)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.server.faults._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        _, fault, provider, rest = [*path.split("/", 3), "", "", ""][:4]
        rest = "/" + rest
        if fault not in FAULTS or provider not in KITS:
            self._send(400, TEXT, f"no fault cell {path}: use /<fault>/<provider>/...".encode())
            self.server.faults._error(f"request outside the matrix: {self.command} {self.path}")
            return
        self.server.faults._record(fault, provider, self.command, rest)
        getattr(self, f"_{fault}")(provider, rest)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    # --- plumbing ---

    def _send(
        self,
        status: int,
        content_type: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, JSON, json.dumps(payload).encode(), headers)

    def _gone(self, wait: float = 0.0) -> bool:
        """Whether the client hung up (or the server stops), waiting up to `wait` to find out."""
        if self.server.faults.stopping.is_set():
            return True
        try:
            readable, _, _ = select.select([self.connection], [], [], wait)
            return bool(readable) and not self.connection.recv(4096)
        except (OSError, ValueError):
            return True

    def _endless(self, status: int, headers: dict[str, str]) -> None:
        self.close_connection = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()

    # --- the faults ---

    def _timeout(self, provider: str, path: str) -> None:
        self.close_connection = True
        while not self._gone(0.1):
            pass

    def _refused(self, provider: str, path: str) -> None:
        """Nothing listens at a refused account's URL; reaching this is a harness bug."""
        self.server.faults._error(f"a refused cell reached the server: {provider} {path}")
        self._send(500, TEXT, b"refused cells must point at a closed port\n")

    def _auth(self, provider: str, path: str) -> None:
        status, content_type, body = KITS[provider].faults.auth
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self._send(status, content_type, data)

    def _not_found(self, provider: str, path: str) -> None:
        self._send_json(404, KITS[provider].faults.not_found(self.command, path))

    def _rate_limited(self, provider: str, path: str) -> None:
        self._send_json(429, KITS[provider].faults.rate_limited, {"Retry-After": "1"})

    def _http_500(self, provider: str, path: str) -> None:
        self._send_json(500, {"message": "Server Error"})

    def _http_502_html(self, provider: str, path: str) -> None:
        self._send(502, HTML, NGINX_502.encode())

    def _truncated(self, provider: str, path: str) -> None:
        self._send(200, JSON, truncated(provider, self.command, path))

    def _wrong_shape(self, provider: str, path: str) -> None:
        """Valid JSON that every parser of the provider must refuse at its top: no key a
        provider reads as its own error message, so the answer can only be bad_response."""
        self._send_json(200, KITS[provider].faults.wrong_shape(hostile()))

    def _huge(self, provider: str, path: str) -> None:
        # a proxy's 50 MB can come with a Content-Length or chunked; a cap must hold for both
        chunked = KITS[provider].faults.huge_chunked
        framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": HUGE_BYTES}
        self._endless(200, {"Content-Type": JSON, **{k: str(v) for k, v in framing.items()}})
        try:
            for piece in huge_pieces():
                if self.server.faults.stopping.is_set():
                    return
                if chunked:
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                else:
                    self.wfile.write(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            return  # the client stopped reading: what a byte cap should do

    def _drip(self, provider: str, path: str) -> None:
        self._endless(200, {"Content-Type": JSON, "Content-Length": str(DRIP_DECLARED)})
        body = b'{"success": true, "data": ['
        sent = 0
        try:
            while sent < DRIP_DECLARED and not self._gone(DRIP_EVERY):
                self.wfile.write(body[sent : sent + 1] if sent < len(body) else b" ")
                sent += 1
        except OSError:
            return


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where connecting is refused: bound (so nothing else takes it while the
    test runs) but never listening, which Linux answers with RST."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()
