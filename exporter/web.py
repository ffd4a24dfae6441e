"""The HTTP surface: /metrics, the landing page, health, readiness, reload and providers' routes.

aiohttp on the exporter's own event loop, so the web side reads the snapshot where it is written
and no thread ever touches exporter state. /metrics hands out bytes that already exist: a big
plain body is written from the chunks it is made of, never joined whole; a gzip body is made
at most once per published exposition, and a gzip scrape that arrives while the newest one is
still being compressed gets the previous one rather than waiting, if that one was the newest a
moment ago (GZIP_STALE). Scrapers back to back get a new gzip after a rest (GZIP_REST), not one
per version. A scraper at a steady interval (Prometheus) has its next body compressed just before
it is due (Rhythm), so it finds it ready instead of waiting for a compression.

Two listeners at most: the main one serves everything, behind the web config's TLS and basic
auth; the optional ingest listener serves only providers' routes (D7's ingest API and webhook),
which carry their own tokens, so the port that faces the internet exposes nothing else. Each
connection must send its request headers within HEADER_TIMEOUT (and is closed after as long idle),
a body within BODY_TIMEOUT, and at most MAX_CONNECTIONS are open per listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import resource
import socket
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from aiohttp import web

from exporter import status as statuspage
from exporter.routing import Request, Response, Route, json_response, text
from exporter.snapshot import Exposition, Snapshot, Variant, batches
from exporter.status import Status

log = logging.getLogger(__name__)

DEFAULT_PORT = 10467
MAX_BODY = 1 << 20
BACKLOG = 1024
MAX_CONNECTIONS = 1024  # per listener at most; one more is answered 503 and closed
FD_RESERVE = 256  # descriptors kept for everything else: providers' connections, the ledger
TLS_HANDSHAKE_TIMEOUT = 10.0
STREAM_OVER = 1 << 20  # bytes: a bigger plain /metrics body is written in batches
STREAM_BATCH = 256 << 10  # bytes per write of a streamed body
# after compressing a version for gzip scrapers, rest up to this many times as long before the
# next: with scrapers back to back and a new version every 100 ms, gzip stays under ~20% of a core
GZIP_REST = 4
GZIP_STALE = 2.0  # seconds: the oldest gzip body served rather than waiting for the newest
# A scraper whose last three gzip scrapes came this far apart or more, at a steady interval
# (within RHYTHM_SLACK of it), has the next body compressed just before it is due.
RHYTHM_MIN = 2 * GZIP_STALE
RHYTHM_SLACK = 0.05
RHYTHM_KEEP = 16  # scrapers followed at most (the most recent)
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
        snapshot: Snapshot,
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
        self._snapshot = snapshot
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
        # per variant, the newest gzip body served: its generation, bytes, when it was the newest
        self._latest: dict[Variant, tuple[int, bytes, float]] = {}
        # no new gzip before then: compressing every version scrapers meet would take a core
        self._rest_until: dict[Variant, float] = {}
        self._zipping: dict[Variant, asyncio.Future[bytes]] = {}  # at most one gzip at a time
        self._took: dict[Variant, float] = {}  # how long the newest compression took
        self._rhythm = Rhythm()
        self._ahead: dict[tuple[tuple[str, str], Variant], asyncio.TimerHandle] = {}  # per scraper
        self.requests: dict[tuple[str, str], int] = {}  # (handler, code) -> count
        self.exposition_bytes = 0
        self._runners: list[web.AppRunner] = []
        self._open: dict[str, int] = {}  # connections per listener, TLS handshakes included
        self._servers: list[asyncio.Server] = []
        self._sockets: dict[str, socket.socket] = {}

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
            app = web.Application(client_max_size=MAX_BODY)
            handler = self._dispatch if name == "main" else self._dispatch_ingest
            app.router.add_route("*", "/{path:.*}", handler)
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
            tls = self._tls() if name == "main" else self._ingest_tls()
            self._open[name] = 0
            self._servers.append(
                await loop.create_server(
                    functools.partial(self._bounded, name, server),
                    sock=sock,
                    backlog=BACKLOG,
                    ssl=tls,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None,
                )
            )

    def _bounded(self, listener: str, server: web.Server) -> asyncio.Protocol:
        """aiohttp's protocol for a new connection, or past the capacity one that answers 503
        and closes: an overloaded exporter says so instead of running out of descriptors, and
        a flood on one listener never starves the other. Counted here, at accept, so a TLS
        connection counts before (and whether or not) its handshake completes; released when
        the protocol is gone."""
        if self._open[listener] >= capacity(len(self._sockets)):
            return _Refuse()
        self._open[listener] += 1
        released = [False]

        def release() -> None:
            if not released[0]:
                released[0] = True
                self._open[listener] -= 1

        counted = _Counted(server(), release)
        # a TLS handshake that fails never reaches connection_lost: the protocol's end does
        weakref.finalize(counted, release)
        return counted

    async def stop(self) -> None:
        for timer in self._ahead.values():
            timer.cancel()
        self._ahead.clear()
        for server in self._servers:
            server.close()
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
            response = await self._answer(request, ingest_only=False)
        return self._finish(request, response, security)

    async def _dispatch_ingest(self, request: web.Request) -> web.StreamResponse:
        security = self._security()
        return self._finish(request, await self._answer(request, ingest_only=True), security)

    def _finish(
        self, request: web.Request, response: web.StreamResponse, security: Security
    ) -> web.StreamResponse:
        for name, value in security.headers.items():
            response.headers[name] = value
        key = (_handler_label(request.path, self._routes()), str(response.status))
        self.requests[key] = self.requests.get(key, 0) + 1
        return response

    async def _answer(self, request: web.Request, *, ingest_only: bool) -> web.StreamResponse:
        path, method = request.path, request.method
        routes = self._routes()
        if not ingest_only:
            if path == "/metrics" and method in ("GET", "HEAD"):
                return await self._metrics(request)
            if method in ("GET", "HEAD"):
                answer = await self._get(path, request.query.get("fragment") == "1")
                if answer is not None:
                    return _web(answer)
            if method == "POST" and path == "/-/reload":
                return _web(await self._reload_request(request))
        route = next((r for r in routes if r.method == method and r.matches(path)), None)
        if route is None:
            return _web(self._missing(method, path, routes, ingest_only))
        body = await _read_body(request) if method not in ("GET", "HEAD") else b""
        if isinstance(body, Response):
            return _web(body)
        headers = {k.lower(): v for k, v in request.headers.items()}
        return _web(await route.handler(Request(method, path, headers, body)))

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

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        variant = Variant(
            openmetrics=_wants_openmetrics(request.headers.get("Accept", "")),
            gzip=_accepts_gzip(request.headers.get("Accept-Encoding", "")),
        )
        exposition = self._snapshot.exposition
        headers = {"Content-Type": variant.content_type, "Vary": "Accept, Accept-Encoding"}
        steady = variant.gzip and self._follow(request, variant)
        if not variant.gzip:
            self.exposition_bytes = exposition.size(variant.openmetrics)
            if self.exposition_bytes > STREAM_OVER:
                pieces = exposition.pieces(variant.openmetrics)
                return await _stream(request, pieces, self.exposition_bytes, headers)
        body = exposition.ready(variant)
        if body is None and exposition.cheap(variant):
            body = exposition.body(variant)
        if body is not None:
            self._remember_body(exposition.generation, variant, body)
        elif not variant.gzip:
            body = await exposition.body_async(variant)
        elif (previous := self._fallback(variant)) is not None:
            # the newest gzip is on its way, or resting; until then the previous one, a moment older
            body = previous
            if (
                not steady  # its next body is made before it comes: this one would be wasted
                and variant not in self._zipping
                and time.monotonic() >= self._rest_until.get(variant, 0.0)
            ):
                self._zip(exposition, variant)
        else:
            # nothing recent enough at hand: wait for the one on its way (its version was the
            # newest when it started, a moment ago), or for this version's; one at a time, as
            # ten scrapers that each started their own once took 1.3 s
            work = self._zipping.get(variant) or self._zip(exposition, variant)
            body = await asyncio.shield(work)
        if variant.gzip:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    def _follow(self, request: web.Request, variant: Variant) -> bool:
        """Note this gzip scrape; if its scraper comes at a steady interval (Prometheus does),
        compress the newest version just before the next one is due, so that it finds a body
        ready rather than waiting for a compression (100-300 ms at 100k series), for the same
        work: one compression per scrape. True if the scraper is steady."""
        scraper = (getattr(request, "remote", None) or "", request.headers.get("User-Agent", ""))
        now = time.monotonic()
        due, jitter, forgotten = self._rhythm.scraped(scraper, now)
        for gone in forgotten:
            for key in [k for k in self._ahead if k[0] == gone]:
                self._ahead.pop(key).cancel()
        key = (scraper, variant)
        if (timer := self._ahead.pop(key, None)) is not None:
            timer.cancel()
        if due is None:
            return False
        # ahead by twice the newest compression's time and by how much the interval varied,
        # but the body must still be recent enough to serve (GZIP_STALE) when the scrape comes
        lead = min(2 * self._took.get(variant, 0.0) + 0.1 + jitter, GZIP_STALE / 2)
        loop = asyncio.get_running_loop()
        self._ahead[key] = loop.call_later(max(0.0, due - lead - now), self._ahead_of, key)
        return True

    def _ahead_of(self, key: tuple[tuple[str, str], Variant]) -> None:
        self._ahead.pop(key, None)
        variant = key[1]
        exposition = self._snapshot.exposition
        if variant in self._zipping or exposition.ready(variant) is not None:
            return
        self._zip(exposition, variant)

    def _fallback(self, variant: Variant) -> bytes | None:
        """The newest gzip body at hand, if it was the newest version less than GZIP_STALE ago:
        a scraper every 15 s always gets a fresh one (it waits for it), scrapers back to back
        share the work."""
        latest = self._latest.get(variant)
        if latest is None:
            return None
        _, body, newest_at = latest
        return body if time.monotonic() - newest_at < GZIP_STALE else None

    def _zip(self, exposition: Exposition, variant: Variant) -> asyncio.Future[bytes]:
        work = self._zipping[variant] = asyncio.ensure_future(exposition.body_async(variant))
        work.add_done_callback(
            functools.partial(self._remember, exposition.generation, variant, time.monotonic())
        )
        return work

    def _remember(
        self, generation: int, variant: Variant, started: float, done: asyncio.Future[bytes]
    ) -> None:
        self._zipping.pop(variant, None)
        finished = time.monotonic()
        took = self._took[variant] = finished - started
        # short enough that the next body is ready before this one is GZIP_STALE old: it is
        # served until then, and was the newest at `started` at least
        rest = max(0.0, min(GZIP_REST * took, GZIP_STALE - 2.5 * took))
        self._rest_until[variant] = finished + rest
        if not done.cancelled() and done.exception() is None:
            newest = self._snapshot.exposition.generation == generation
            self._remember_body(generation, variant, done.result(), finished if newest else started)

    def _remember_body(
        self, generation: int, variant: Variant, body: bytes, newest_at: float | None = None
    ) -> None:
        """Only gzip bodies are kept as a fallback: a plain body never waits (small ones are
        joined at once, big ones streamed from the chunks). `newest_at`: a moment its version was
        the newest (now, unless said)."""
        if variant.gzip and generation >= self._latest.get(variant, (-1, b"", 0.0))[0]:
            at = time.monotonic() if newest_at is None else newest_at
            self._latest[variant] = (generation, body, at)


class Rhythm:
    """When each scraper is next due, if it scrapes at a steady interval of at least RHYTHM_MIN:
    its last three scrapes, the two gaps within RHYTHM_SLACK of each other. Scrapers back to
    back are left to the fallback and the rest. Keeps the RHYTHM_KEEP most recent scrapers."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[float, float]] = {}  # -> the last two scrapes

    def scraped(
        self, scraper: tuple[str, str], now: float
    ) -> tuple[float | None, float, list[tuple[str, str]]]:
        """When `scraper` is next due (None: not steady), by how much its last two gaps
        differed, and the scrapers forgotten to make room for it."""
        before, last = self._seen.pop(scraper, (math.nan, math.nan))
        self._seen[scraper] = (last, now)  # the most recent last: dicts keep insertion order
        forgotten = []
        while len(self._seen) > RHYTHM_KEEP:
            oldest = next(iter(self._seen))
            del self._seen[oldest]
            forgotten.append(oldest)
        gap, previous = now - last, last - before
        jitter = abs(gap - previous)
        if gap >= RHYTHM_MIN and jitter <= RHYTHM_SLACK * previous:
            return now + gap, jitter, forgotten
        return None, jitter, forgotten


async def _stream(
    request: web.Request, pieces: list[bytes], size: int, headers: dict[str, str]
) -> web.StreamResponse:
    """A big plain body as the chunks it is made of, with its length up front, written in
    batches of about STREAM_BATCH. Each connection then buffers at most about a batch of it,
    where one write of the whole body would have the transport copy what the socket did not
    take at once: ~10 MB per scraper."""
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    await response.prepare(request)
    if request.method != "HEAD":
        for batch in batches(pieces, STREAM_BATCH):
            await response.write(batch)
    await response.write_eof()
    return response


async def _read_body(request: web.Request) -> bytes | Response:
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        return json_response(411, {"error": "send the body with a Content-Length"})
    if request.content_length is not None and request.content_length > MAX_BODY:
        return json_response(
            413,
            {"error": f"body of {request.content_length} bytes is over the limit of {MAX_BODY}"},
        )
    try:
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


def _accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = re.search(r"q\s*=\s*([0-9.]+)", params)
            return not q or float(q[1]) > 0
    return False


def _wants_openmetrics(header: str) -> bool:
    """OpenMetrics when the scraper lists it (Prometheus does, first) with a q above 0."""
    for part in header.split(","):
        kind, _, params = part.strip().partition(";")
        if kind.strip().lower() == "application/openmetrics-text":
            q = re.search(r"q\s*=\s*([0-9.]+)", params)
            return not q or float(q[1]) > 0
    return False
