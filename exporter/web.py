"""The HTTP surface: listeners, routes, auth and connection limits.

Both listeners run on the exporter's own event loop, so the web side reads the snapshot where it
is written and no thread ever touches exporter state: the main one on aiohttp, the ingest one on
exporter.lean (httptools' parser), which costs a callback a fraction of aiohttp's per-request
machinery at campaign rates. /metrics is answered by the serving room
(exporter.serving: formats, gzip, streaming); this module routes to it, to the landing page,
health, readiness, reload and providers' routes, and counts every answer by handler and code
(the built-in handlers' usual codes from 0).

Two listeners at most: the main one serves everything, behind the web config's TLS and basic
auth; the optional ingest listener serves only providers' routes (ingest API and webhooks),
which carry their own tokens, so the port that faces the internet exposes nothing else. Each
connection must send its request headers within HEADER_TIMEOUT (and is closed after as long idle),
a body within BODY_TIMEOUT, and at most MAX_CONNECTIONS are open per listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import resource
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from aiohttp import web

from exporter import lean
from exporter import status as statuspage
from exporter.routing import Request, Response, Route, json_response, text
from exporter.serving import Scrapes
from exporter.status import Status

log = logging.getLogger(__name__)

DEFAULT_PORT = 10467
MAX_BODY = 1 << 20
BACKLOG = 1024
MAX_CONNECTIONS = 1024  # per listener at most; one more is answered 503 and closed
FD_RESERVE = 256  # descriptors kept for everything else: providers' connections, the ledger
TLS_HANDSHAKE_TIMEOUT = 10.0
HEADER_TIMEOUT = 30.0  # seconds to send a request's headers, and to stay idle between requests
BODY_TIMEOUT = 10.0  # seconds to send a declared body


class ListenAddressError(ValueError):
    pass


def parse_listen_address(
    value: str, flag: str = "--web.listen-address"
) -> tuple[str | None, int, socket.AddressFamily]:
    """`:10467` (every address, IPv6 and IPv4 where the host has both), `0.0.0.0:10467`,
    `127.0.0.1:0`, `[::]:10467`, `localhost:10467`. A host of None means every address."""
    match = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]*)):(\d{1,5})", value.strip())
    if not match or int(match[3]) > 65535:
        raise ListenAddressError(f"{flag} {value!r}: expected host:port, :port or [ipv6]:port")
    if match[1] is not None:
        return match[1], int(match[3]), socket.AF_INET6
    if not match[2]:
        dual = socket.has_dualstack_ipv6()
        return None, int(match[3]), socket.AF_INET6 if dual else socket.AF_INET
    return match[2], int(match[3]), socket.AF_INET


def listen(address: str) -> socket.socket:
    host, port, family = parse_listen_address(address)
    if host is None:
        wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
        sock = socket.create_server(
            (wildcard, port),
            family=family,
            backlog=BACKLOG,
            dualstack_ipv6=family == socket.AF_INET6,
        )
    else:
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


_BUILT_IN = {
    "/metrics": "GET, HEAD",
    "/": "GET, HEAD",
    "/config": "GET, HEAD",
    "/-/healthy": "GET, HEAD",
    "/-/ready": "GET, HEAD",
    "/-/reload": "POST",
}
# what the built-in handlers answer in the normal run of things: counted from 0 (auth refusals,
# 404s and providers' routes only once they happen)
_USUAL = {
    "/metrics": ("200",),
    "/": ("200",),
    "/config": ("200",),
    "/-/healthy": ("200",),
    "/-/ready": ("200", "503"),
}


class Security(Protocol):
    """What the web config decides per request (exporter.webconfig implements it)."""

    headers: Mapping[str, str]

    async def allowed(self, authorization: str | None) -> bool: ...


class _Open:
    headers: Mapping[str, str] = {}

    async def allowed(self, authorization: str | None) -> bool:
        return True


class WebServer:
    def __init__(
        self,
        address: str,
        scrapes: Scrapes,
        *,
        ready: Callable[[], bool],
        reload: Callable[[], Awaitable[tuple[bool, str]]],
        routes: Callable[[], Sequence[Route]] = tuple,
        lifecycle: bool = False,
        ingest_address: str | None = None,
        security: Callable[[], Security] = _Open,
        tls: Callable[[], ssl.SSLContext | None] = lambda: None,
        ingest_tls: Callable[[], ssl.SSLContext | None] | None = None,
        status: Callable[[], Awaitable[Status]] | None = None,
        config_view: Callable[[], str] = lambda: "",
    ):
        self._addresses = {
            "main": address,
            **({"ingest": ingest_address} if ingest_address else {}),
        }
        for name, value in self._addresses.items():
            parse_listen_address(
                value, "--web.listen-address" if name == "main" else "--web.ingest-address"
            )
        self._scrapes = scrapes
        self._ready = ready
        self._reload = reload
        self._routes = routes
        self._lifecycle = lifecycle
        self._security = security  # the current web config's auth and headers, re-read on change
        self._tls = tls
        # the ingest listener: the same certificate, never client certificates (D7 has none)
        self._ingest_tls = ingest_tls or tls
        self._status = status
        self._config_view = config_view
        usual = {**_USUAL, **({"/-/reload": ("200", "500")} if lifecycle else {})}
        self.requests: dict[tuple[str, str], int] = {  # (handler, code) -> count
            (handler, code): 0 for handler, codes in usual.items() for code in codes
        }
        self._runners: list[web.AppRunner] = []
        self._open: dict[str, int] = {}  # connections per listener, TLS handshakes included
        self._servers: list[asyncio.Server] = []
        self._sockets: dict[str, socket.socket] = {}
        self._lean: weakref.WeakSet[lean.Connection] = weakref.WeakSet()

    @property
    def port(self) -> int:
        return self.port_of("main")

    def port_of(self, listener: str) -> int:
        return self._sockets[listener].getsockname()[1]

    async def start(self) -> None:
        """Bind every listener first, so a taken port fails the start before anything serves."""
        for name, address in self._addresses.items():
            self._sockets[name] = listen(address)
        loop = asyncio.get_running_loop()
        for name, sock in self._sockets.items():
            tls = self._tls() if name == "main" else self._ingest_tls()
            self._open[name] = 0
            if name == "ingest":
                self._servers.append(await self._serve_lean(name, sock, tls))
                continue
            app = web.Application(client_max_size=MAX_BODY)
            app.router.add_route("*", "/{path:.*}", self._dispatch)
            runner = web.AppRunner(
                app,
                access_log=None,
                handle_signals=False,
                keepalive_timeout=HEADER_TIMEOUT,
                shutdown_timeout=1.0,  # SIGTERM: a running scrape gets a second, no more
            )
            await runner.setup()
            self._runners.append(runner)
            server = runner.server
            assert server is not None
            self._servers.append(
                await loop.create_server(
                    functools.partial(self._bounded, name, server),
                    sock=sock,
                    backlog=BACKLOG,
                    ssl=tls,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None,
                )
            )

    async def _serve_lean(
        self, name: str, sock: socket.socket, tls: ssl.SSLContext | None
    ) -> asyncio.Server:
        """The ingest listener on exporter.lean: callbacks at campaign rates."""

        def extra() -> tuple[tuple[str, str], ...]:
            return tuple(self._security().headers.items())

        turns = lean.Turns()  # a burst of callbacks takes turns with scrapes and polls

        def connection() -> asyncio.Protocol:
            release = self._admit(name)
            if release is None:
                return _Refuse()
            made = lean.Connection(
                self._ingest, extra, release, HEADER_TIMEOUT, BODY_TIMEOUT, MAX_BODY, turns
            )
            self._lean.add(made)
            weakref.finalize(made, release)  # a TLS handshake that fails never reaches it
            return made

        return await asyncio.get_running_loop().create_server(
            connection,
            sock=sock,
            backlog=BACKLOG,
            ssl=tls,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None,
        )

    def _bounded(self, listener: str, server: web.Server) -> asyncio.Protocol:
        """aiohttp's protocol for a new connection, or past the capacity one that answers 503
        and closes: an overloaded exporter says so instead of running out of descriptors, and
        a flood on one listener never starves the other. Counted here, at accept, so a TLS
        connection counts before (and whether or not) its handshake completes; released when
        the protocol is gone."""
        release = self._admit(listener)
        if release is None:
            return _Refuse()
        counted = _Counted(server(), release)
        # a TLS handshake that fails never reaches connection_lost: the protocol's end does
        weakref.finalize(counted, release)
        return counted

    def _admit(self, listener: str) -> Callable[[], None] | None:
        """A new connection counted against its listener's capacity, and how to release it
        (at most once, whichever end comes first); None past the capacity."""
        if self._open[listener] >= capacity(len(self._sockets)):
            return None
        self._open[listener] += 1
        released = [False]

        def release() -> None:
            if not released[0]:
                released[0] = True
                self._open[listener] -= 1

        return release

    async def stop(self) -> None:
        self._scrapes.stop()
        for server in self._servers:
            server.close()
        for connection in list(self._lean):
            connection.close()
        for runner in self._runners:
            await runner.cleanup()
        self._servers, self._runners = [], []

    # --- routing ---

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        security = self._security()
        if not await security.allowed(request.headers.get("Authorization")):
            response = _web(text(401, "Unauthorized."))
            response.headers["WWW-Authenticate"] = 'Basic realm="whatsapp-exporter"'
        else:
            response = await self._answer(request)
        return self._finish(request, response, security)

    async def _ingest(self, request: Request, refusal: Response | None) -> Response:
        """The ingest listener's requests: providers' routes only; `refusal` is the server's
        own answer to a body it would not read (411, 413, 408)."""
        path, method = request.path, request.method
        routes = self._routes()
        route = next((r for r in routes if r.method == method and r.matches(path)), None)
        if route is None:
            response = self._missing(method, path, routes, True)
        elif refusal is not None:
            if refusal.status == 413 and route.refused is not None:
                route.refused(request, "too_large")
            response = refusal
        else:
            response = await route.handler(request)
        key = (_handler_label(path, routes), str(response.status))
        self.requests[key] = self.requests.get(key, 0) + 1
        return response

    def _finish(
        self, request: web.Request, response: web.StreamResponse, security: Security
    ) -> web.StreamResponse:
        for name, value in security.headers.items():
            response.headers[name] = value
        key = (_handler_label(request.path, self._routes()), str(response.status))
        self.requests[key] = self.requests.get(key, 0) + 1
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        routes = self._routes()
        if path == "/metrics" and method in ("GET", "HEAD"):
            return await self._scrapes.answer(request)
        if method in ("GET", "HEAD"):
            answer = await self._get(path, request.query.get("fragment") == "1")
            if answer is not None:
                return _web(answer)
        if method == "POST" and path == "/-/reload":
            return _web(await self._reload_request(request))
        route = next((r for r in routes if r.method == method and r.matches(path)), None)
        if route is None:
            return _web(self._missing(method, path, routes, False))
        body = await _read_body(request) if method not in ("GET", "HEAD") else b""
        seen = Request(method, path, request.headers, b"", request.query_string)
        if isinstance(body, Response):
            if body.status == 413 and route.refused is not None:
                route.refused(seen, "too_large")
            return _web(body)
        return _web(await route.handler(dataclasses.replace(seen, body=body)))

    async def _reload_request(self, request: web.Request) -> Response:
        if not self._lifecycle:
            return text(403, "Lifecycle API is not enabled: start with --web.enable-lifecycle.")
        body = await _read_body(request)
        if isinstance(body, Response):
            return body
        ok, message = await self._reload()
        return text(200 if ok else 500, message)

    async def _get(self, path: str, fragment: bool) -> Response | None:
        if path == "/" and self._status is not None:
            status = await self._status()
            body = statuspage.fragment(status) if fragment else statuspage.page(status)
            return Response(200, body, "text/html; charset=utf-8", (("Cache-Control", "no-store"),))
        if path == "/config":
            return Response(200, self._config_view().encode(), "text/plain; charset=utf-8")
        if path == "/-/healthy":
            return text(200, "Healthy.")
        if path == "/-/ready":
            return (
                text(200, "Ready.")
                if self._ready()
                else text(503, "Not ready: first polls running.")
            )
        return None

    def _missing(
        self, method: str, path: str, routes: Sequence[Route], ingest_only: bool
    ) -> Response:
        built_in = "" if ingest_only else _BUILT_IN.get(path, "")
        allowed = ", ".join(r.method for r in routes if r.matches(path)) or built_in
        if allowed:
            return Response(
                405,
                f"Method {method} not allowed on {path}; use {allowed}.\n".encode(),
                headers=(("Allow", allowed),),
            )
        if ingest_only:
            return text(404, "Not found. This port serves only the ingest API and webhooks.")
        return text(404, f"Not found: {_redacted(path)}. See / for what this exporter serves.")


async def _read_body(request: web.Request) -> bytes | Response:
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        return json_response(411, {"error": "send the body with a Content-Length"})
    if request.content_length is not None and request.content_length > MAX_BODY:
        return json_response(
            413,
            {"error": f"body of {request.content_length} bytes is over the limit of {MAX_BODY}"},
        )
    try:
        if request.content.is_eof():  # all of it came with the headers: no timer to set
            return await request.read()
        async with asyncio.timeout(BODY_TIMEOUT):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return json_response(413, {"error": f"the body is over the limit of {MAX_BODY} bytes"})
    except TimeoutError:
        return json_response(
            408, {"error": f"the body did not arrive within {BODY_TIMEOUT:g}s of its headers"}
        )


def capacity(listeners: int) -> int:
    """Connections one listener may hold: MAX_CONNECTIONS, or fewer when the open-files limit
    (a systemd unit's 1024, say) would run out first. Read at every accept, since the limit
    can change under a running process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, (soft - FD_RESERVE) // max(1, listeners)))


def raise_open_files_limit() -> None:
    """The soft limit up to the hard one, as Go's runtime does for every Go exporter."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))


class _Counted(asyncio.Protocol):
    """aiohttp's protocol, with its end reported (aiohttp's has no weak references)."""

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]):
        self._inner = inner
        self._release = release

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._release()


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        transport.close()


_SECRET_SEGMENT = re.compile(r"^(/webhooks/[^/]+/[^/]+/)[^/]+")


def _redacted(path: str) -> str:
    """A webhook path's last segment may be its secret: never echoed or logged."""
    return _SECRET_SEGMENT.sub(r"\1<secret>", path)


def _handler_label(path: str, routes: Sequence[Route]) -> str:
    """A bounded label: the route's own path, never the request's (ids, secrets)."""
    if path in _BUILT_IN:
        return path
    for route in routes:
        if route.matches(path):
            return route.path
    return "other"


def _web(response: Response) -> web.Response:
    headers = {"Content-Type": response.content_type, **dict(response.headers)}
    return web.Response(status=response.status, body=response.body, headers=headers)
