"""The HTTP surface: /metrics, the landing page, health, readiness, reload and providers' routes.

aiohttp on the exporter's own event loop, so the web side reads the snapshot where it is written
and no thread ever touches exporter state. /metrics hands out bytes that are already joined: a
variant (format, gzip) is made once per published exposition, and a gzip scrape that arrives
while the newest one is still being compressed gets the previous one rather than waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import html
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from exporter import __version__
from exporter.routing import Request, Response, Route, json_response, text
from exporter.snapshot import Snapshot, TargetState, Variant

log = logging.getLogger(__name__)

DEFAULT_PORT = 10467
MAX_BODY = 1 << 20
BACKLOG = 1024


class ListenAddressError(ValueError):
    pass


def parse_listen_address(value: str) -> tuple[str, int, socket.AddressFamily]:
    """`:10467`, `0.0.0.0:10467`, `127.0.0.1:0`, `[::]:10467`, `localhost:10467`."""
    match = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]*)):(\d{1,5})", value.strip())
    if not match or int(match[3]) > 65535:
        raise ListenAddressError(
            f"--web.listen-address {value!r}: expected host:port, :port or [ipv6]:port"
        )
    if match[1] is not None:
        return match[1], int(match[3]), socket.AF_INET6
    return match[2] or "0.0.0.0", int(match[3]), socket.AF_INET


_BUILT_IN = {
    "/metrics": "GET, HEAD",
    "/": "GET, HEAD",
    "/-/healthy": "GET, HEAD",
    "/-/ready": "GET, HEAD",
    "/-/reload": "POST",
}


class WebServer:
    def __init__(
        self,
        address: str,
        snapshot: Snapshot,
        *,
        ready: Callable[[], bool],
        reload: Callable[[], Awaitable[tuple[bool, str]]],
        routes: Callable[[], Sequence[Route]] = tuple,
    ):
        self._host, self._port, self._family = parse_listen_address(address)
        self._snapshot = snapshot
        self._ready = ready
        self._reload = reload
        self._routes = routes
        self._latest: dict[Variant, tuple[int, bytes]] = {}  # newest body served per variant
        self._runner: web.AppRunner | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        assert self._socket is not None
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY, handler_args={"max_field_size": 8190})
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._socket = socket.create_server(
            (self._host, self._port), family=self._family, backlog=BACKLOG, reuse_port=False
        )
        self._socket.setblocking(False)
        await web.SockSite(self._runner, self._socket, backlog=BACKLOG).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- routing ---

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        if path == "/metrics" and method in ("GET", "HEAD"):
            return await self._metrics(request)
        if method in ("GET", "HEAD"):
            answer = self._get(path)
            if answer is not None:
                return _web(answer)
        if method == "POST" and path == "/-/reload":
            body = await _read_body(request)
            if isinstance(body, Response):
                return _web(body)
            ok, message = await self._reload()
            return _web(text(200 if ok else 500, message))
        routes = self._routes()
        route = next((r for r in routes if r.method == method and r.matches(path)), None)
        if route is None:
            return _web(self._missing(method, path, routes))
        body = await _read_body(request) if method not in ("GET", "HEAD") else b""
        if isinstance(body, Response):
            return _web(body)
        headers = {k.lower(): v for k, v in request.headers.items()}
        return _web(await route.handler(Request(method, path, headers, body)))

    def _get(self, path: str) -> Response | None:
        if path == "/":
            return Response(200, landing_page(self._snapshot.targets()), "text/html; charset=utf-8")
        if path == "/-/healthy":
            return text(200, "Healthy.")
        if path == "/-/ready":
            return (
                text(200, "Ready.")
                if self._ready()
                else text(503, "Not ready: first polls running.")
            )
        return None

    def _missing(self, method: str, path: str, routes: Sequence[Route]) -> Response:
        allowed = ", ".join(r.method for r in routes if r.matches(path)) or _BUILT_IN.get(path, "")
        if allowed:
            return Response(
                405,
                f"Method {method} not allowed on {path}; use {allowed}.\n".encode(),
                headers=(("Allow", allowed),),
            )
        return text(404, f"Not found: {path}. See / for what this exporter serves.")

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        variant = Variant(
            openmetrics=_wants_openmetrics(request.headers.get("Accept", "")),
            gzip=_accepts_gzip(request.headers.get("Accept-Encoding", "")),
        )
        exposition = self._snapshot.exposition
        body = exposition.ready(variant)
        if body is None and exposition.cheap(variant):
            body = exposition.body(variant)
        if body is None:
            previous = self._latest.get(variant)
            work = asyncio.ensure_future(exposition.body_async(variant))
            if variant.gzip and previous is not None:
                # the newest gzip is on its way; until then, the previous one, a moment older
                work.add_done_callback(
                    functools.partial(self._remember, exposition.generation, variant)
                )
                body = previous[1]
            else:
                body = await work
                self._remember_body(exposition.generation, variant, body)
        else:
            self._remember_body(exposition.generation, variant, body)
        headers = {"Content-Type": variant.content_type, "Vary": "Accept, Accept-Encoding"}
        if variant.gzip:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    def _remember(self, generation: int, variant: Variant, done: asyncio.Future[bytes]) -> None:
        if not done.cancelled() and done.exception() is None:
            self._remember_body(generation, variant, done.result())

    def _remember_body(self, generation: int, variant: Variant, body: bytes) -> None:
        if generation >= self._latest.get(variant, (-1, b""))[0]:
            self._latest[variant] = (generation, body)


async def _read_body(request: web.Request) -> bytes | Response:
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        return json_response(411, {"error": "send the body with a Content-Length"})
    if request.content_length is not None and request.content_length > MAX_BODY:
        return json_response(
            413,
            {"error": f"body of {request.content_length} bytes is over the limit of {MAX_BODY}"},
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return json_response(413, {"error": f"the body is over the limit of {MAX_BODY} bytes"})


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


def _ago(moment: float | None, now: float) -> str:
    if moment is None:
        return "never"
    stamp = dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({max(0, now - moment):.0f}s ago)"


def _state(target: TargetState) -> str:
    if target.up is None:
        return "pending"
    if target.stale:
        return "stale"
    return "up" if target.up else "down"


def landing_page(targets: list[TargetState]) -> bytes:
    now = time.time()
    rows = "\n".join(
        "<tr class='{state}'><td>{p}</td><td>{a}</td><td>{e}</td><td>{t}</td><td>{state}</td>"
        "<td>{poll}</td><td>{ok}</td><td>{err}</td></tr>".format(
            p=html.escape(s.key.provider),
            a=html.escape(s.key.account),
            e=html.escape(s.key.endpoint),
            t=html.escape(s.key.target) or "<i>account</i>",
            state=_state(s),
            poll=_ago(s.last_poll, now),
            ok=_ago(s.last_success, now),
            err=html.escape(s.error if s.up is False else ""),
        )
        for s in targets
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>WhatsApp Delivery Exporter</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .3em .8em; border-bottom: 1px solid #ddd;
text-align: left; }} tr.down td, tr.stale td {{ background: #fee; }}
tr.pending td {{ color: #888; }}
</style></head>
<body>
<h1>WhatsApp Delivery Exporter</h1>
<p>Version {html.escape(__version__)}. Metrics: <a href="/metrics">/metrics</a>.
Health: <a href="/-/healthy">/-/healthy</a>, <a href="/-/ready">/-/ready</a>.
Values are polled in the background; each is at most one poll interval old.</p>
<h2>Targets</h2>
<table>
<tr><th>provider</th><th>account</th><th>endpoint</th><th>target</th><th>state</th>
<th>last poll</th><th>last success</th><th>error</th></tr>
{rows or '<tr><td colspan="8">No targets configured.</td></tr>'}
</table>
</body></html>
"""
    return page.encode()
