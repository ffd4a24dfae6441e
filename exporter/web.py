"""The HTTP surface: /metrics, the landing page, health, readiness and reload.

A threaded stdlib server (as prometheus_client's own) that never touches the event loop for a
scrape: /metrics hands out bytes the snapshot already rendered, so a slow provider or a busy poll
never slows a scrape. Further routes (the D7 ingest API) plug in through `routes`.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from exporter import __version__
from exporter.snapshot import CONTENT_TYPE, Snapshot, TargetState

log = logging.getLogger(__name__)

DEFAULT_PORT = 10467


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


def json_response(status: int, payload: object) -> Response:
    return Response(status, json.dumps(payload).encode() + b"\n", "application/json")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes


# A route takes the request (body already read and size-checked) and answers.
Route = Callable[[Request], Response]


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


class WebServer:
    def __init__(
        self,
        address: str,
        snapshot: Snapshot,
        *,
        ready: Callable[[], bool],
        reload: Callable[[], tuple[bool, str]],
        routes: Mapping[tuple[str, str], Route] | None = None,
        prefix_routes: Mapping[tuple[str, str], Route] | None = None,
        max_body: int = 1 << 20,
    ):
        host, port, family = parse_listen_address(address)
        handler = _handler(
            snapshot, ready, reload, dict(routes or {}), dict(prefix_routes or {}), max_body
        )
        server_class = type("_Server", (_Server,), {"address_family": family})
        self._server = server_class((host, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="web", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> WebServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # a client that hangs up mid-answer is not the operator's problem; no traceback on stderr
        log.debug("error while answering %s", client_address, exc_info=True)


def _handler(
    snapshot: Snapshot,
    ready: Callable[[], bool],
    reload: Callable[[], tuple[bool, str]],
    routes: dict[tuple[str, str], Route],
    prefix_routes: dict[tuple[str, str], Route],
    max_body: int,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"whatsapp-exporter/{__version__}"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:
            log.debug("http: " + format, *args)

        def do_GET(self) -> None:
            self._answer(self._get())

        def do_HEAD(self) -> None:
            self._answer(self._get(), head=True)

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/-/reload":
                refused = self._read_body()
                if isinstance(refused, Response):
                    self._answer(refused)
                    return
                ok, message = reload()
                self._answer(text(200 if ok else 500, message))
                return
            route = _find(routes, prefix_routes, "POST", path)
            body = self._read_body()
            if route is None and not isinstance(body, Response):
                body = self._missing(path)
            if isinstance(body, Response):
                self._answer(body)
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._answer(route(Request("POST", path, headers, body)))

        def do_PUT(self) -> None:
            body = self._read_body()
            path = self.path.split("?", 1)[0]
            self._answer(body if isinstance(body, Response) else self._missing(path))

        do_DELETE = do_PATCH = do_PUT

        def _get(self) -> Response:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                exposition = snapshot.exposition
                if _accepts_gzip(self.headers.get("Accept-Encoding", "")):
                    return Response(
                        200,
                        exposition.gzipped,
                        CONTENT_TYPE,
                        (("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")),
                    )
                return Response(200, exposition.plain, CONTENT_TYPE, (("Vary", "Accept-Encoding"),))
            if path == "/":
                return Response(200, landing_page(snapshot.targets()), "text/html; charset=utf-8")
            if path == "/-/healthy":
                return text(200, "Healthy.")
            if path == "/-/ready":
                return (
                    text(200, "Ready.") if ready() else text(503, "Not ready: first polls running.")
                )
            route = _find(routes, prefix_routes, "GET", path)
            if route is not None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                return route(Request("GET", path, headers, b""))
            return self._missing(path)

        def _missing(self, path: str) -> Response:
            allowed = _allowed_methods(path, routes, prefix_routes)
            if allowed:
                return Response(
                    405,
                    f"Method {self.command} not allowed on {path}; use {allowed}.\n".encode(),
                    headers=(("Allow", allowed),),
                )
            return text(404, f"Not found: {path}. See / for what this exporter serves.")

        def _read_body(self) -> bytes | Response:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                return json_response(411, {"error": "send the body with a Content-Length"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.close_connection = True
                return json_response(400, {"error": "Content-Length is not a number"})
            if length < 0:
                self.close_connection = True
                return json_response(400, {"error": "Content-Length is negative"})
            if length > max_body:
                self.close_connection = True
                return json_response(
                    413, {"error": f"body of {length} bytes is over the limit of {max_body}"}
                )
            return self.rfile.read(length)

        def _answer(self, response: Response, head: bool = False) -> None:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(response.body)

    return Handler


_BUILT_IN = {
    "/metrics": "GET, HEAD",
    "/": "GET, HEAD",
    "/-/healthy": "GET, HEAD",
    "/-/ready": "GET, HEAD",
    "/-/reload": "POST",
}


def _allowed_methods(
    path: str,
    routes: dict[tuple[str, str], Route],
    prefix_routes: dict[tuple[str, str], Route],
) -> str:
    """What a 405 offers instead; empty for a path nothing serves (a 404)."""
    methods = [m for m, p in routes if p == path]
    methods += [m for m, p in prefix_routes if path.startswith(p) and len(path) > len(p)]
    return ", ".join(methods) or _BUILT_IN.get(path, "")


def _find(
    routes: dict[tuple[str, str], Route],
    prefix_routes: dict[tuple[str, str], Route],
    method: str,
    path: str,
) -> Route | None:
    if (method, path) in routes:
        return routes[(method, path)]
    for (m, prefix), route in prefix_routes.items():
        if m == method and path.startswith(prefix) and len(path) > len(prefix):
            return route
    return None


def _accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
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
