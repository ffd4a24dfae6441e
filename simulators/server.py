"""The machinery every provider simulator shares.

A simulator is a real HTTP server on loopback that speaks one provider's documented API, so the
exporter is tested against the same bytes it will see in production: faults (slow answers, 5xx,
HTML from a proxy, truncated JSON) are injected per endpoint, and every request is recorded so a
test can prove what the exporter did and did not call. State lives behind one lock; a background
ticker evolves it from a seeded `random.Random`, so a run can be repeated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger("simulators")

MAX_BODY = 1 << 20
REQUEST_LOG_SIZE = 50_000
CONTROL_REQUEST_LIMIT = 1000
CONTROL_PREFIX = "/_sim"

NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived, so tests can assert exactly what the exporter sent."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    time: float
    endpoint: str

    def json(self) -> Any:
        return json.loads(self.body)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.body.decode("utf-8", errors="replace"),
            "time": self.time,
            "endpoint": self.endpoint,
        }


def _number(value: Any, what: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum:g}, got {value!r}")
    return float(value)


def check_probabilities(**values: float) -> None:
    """Refuses a simulator option named p_* that is not a probability."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"{key} must be between 0 and 1")


@dataclass(frozen=True)
class Fault:
    """A way for a provider to misbehave; build one with the constructors, not directly."""

    kind: str
    seconds: float = 0.0
    code: int = 0
    body: Any = None
    retry_after: float = 0.0
    message: str | None = None

    KINDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "latency": ("seconds",),
        "timeout": ("seconds",),
        "status": ("code", "body"),
        "rate_limited": ("retry_after",),
        "html_502": (),
        "malformed_json": (),
        "wrong_shape": (),
        "provider_error": ("message",),
    }

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        return cls("latency", seconds=_number(seconds, "seconds"))

    @classmethod
    def timeout(cls, seconds: float = 30.0) -> Fault:
        return cls("timeout", seconds=_number(seconds, "seconds"))

    @classmethod
    def status(cls, code: int, body: Any = None) -> Fault:
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise ValueError(f"code must be an HTTP status between 100 and 599, got {code!r}")
        try:
            json.dumps(body)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"body must be a string or JSON-able: {exc}") from None
        return cls("status", code=code, body=body)

    @classmethod
    def rate_limited(cls, retry_after: float = 2) -> Fault:
        return cls("rate_limited", retry_after=_number(retry_after, "retry_after"))

    @classmethod
    def html_502(cls) -> Fault:
        return cls("html_502")

    @classmethod
    def malformed_json(cls) -> Fault:
        return cls("malformed_json")

    @classmethod
    def wrong_shape(cls) -> Fault:
        return cls("wrong_shape")

    @classmethod
    def provider_error(cls, message: str | None = None) -> Fault:
        if message is not None and not isinstance(message, str):
            raise ValueError(f"message must be a string, got {message!r}")
        return cls("provider_error", message=message)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """Builds a fault from the JSON a person posts to `/_sim/faults`."""
        kind = data.get("kind")
        if kind not in cls.KINDS:
            raise ValueError(f"kind must be one of {', '.join(cls.KINDS)}; got {kind!r}")
        params = {k: v for k, v in data.items() if k != "kind"}
        unknown = sorted(set(params) - set(cls.KINDS[kind]))
        if unknown:
            allowed = ", ".join(cls.KINDS[kind]) or "no parameters"
            raise ValueError(f"fault kind {kind!r} takes {allowed}; unknown: {', '.join(unknown)}")
        if kind == "latency" and "seconds" not in params:
            raise ValueError("fault kind 'latency' needs 'seconds'")
        if kind == "status" and "code" not in params:
            raise ValueError("fault kind 'status' needs 'code'")
        return getattr(cls, kind)(**params)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for name in self.KINDS[self.kind]:
            out[name] = getattr(self, name)
        return out


@dataclass
class Response:
    """An answer to send; status 0 means: send nothing and drop the connection."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


DROP = Response(0)


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, "application/json", dict(headers or {}))


def text_response(
    status: int, text: str, content_type: str = "text/plain; charset=utf-8"
) -> Response:
    return Response(status, text.encode(), content_type)


class ControlError(Exception):
    """A malformed control request: answered with 400 and this message."""


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    endpoint: str
    handler: Callable[..., Response]


def route(method: str, pattern: str, endpoint: str, handler: Callable[..., Response]) -> Route:
    return Route(method, re.compile(pattern + r"\Z"), endpoint, handler)


@dataclass
class _ActiveFault:
    fault: Fault
    remaining: int | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-answer is normal here (timeouts, stop()); not worth a traceback.
        log.debug(
            "%s: connection from %s ended with an error",
            self.simulator.name,
            client_address,
            exc_info=True,
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes; don't wait for ACKs
    timeout = 60  # idle keep-alive connections are closed after this
    server: _Server

    def setup(self) -> None:
        tls = self.server.simulator.tls
        if tls is not None:  # the handshake in this connection's thread, never the accept loop
            self.request = tls.wrap_socket(self.request, server_side=True)
        super().setup()
        self.server.simulator._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.simulator._untrack(self.connection)

    def version_string(self) -> str:
        return self.server.simulator.server_header

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s " + format, self.server.simulator.name, self.address_string(), *args)

    def _dispatch(self) -> None:
        body = self._read_body()
        if body is None:
            return
        split = urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            path=split.path or "/",
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            time=time.time(),
            endpoint="unknown",
        )
        sim = self.server.simulator
        try:
            if request.path == CONTROL_PREFIX or request.path.startswith(CONTROL_PREFIX + "/"):
                response = sim._control(request)
            else:
                response = sim._serve(request)
        except Exception:
            log.exception("%s: internal error answering %s %s", sim.name, self.command, split.path)
            response = json_response(500, {"error": "simulator internal error"})
        self._send(response)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            self._refuse(400, "invalid Content-Length")
            return None
        if size > MAX_BODY:
            self._refuse(413, "request body too large")
            return None
        return self.rfile.read(size)

    def _read_chunked(self) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                self._refuse(400, "invalid chunked encoding")
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                self._refuse(413, "request body too large")
                return None
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _refuse(self, status: int, message: str) -> None:
        response = json_response(status, {"error": message})
        response.headers["Connection"] = "close"
        self.close_connection = True
        self._send(response)

    def _send(self, response: Response) -> None:
        if response.status == 0:
            self.close_connection = True
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)


class Simulator:
    """Base of every provider simulator: server, request log, faults, control API and ticker."""

    name: ClassVar[str] = "simulator"
    base_path: ClassVar[str] = ""
    server_header: ClassVar[str] = "nginx"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = 0,
        auto: bool = True,
        tick: float = 1.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if _number(tick, "tick") <= 0:
            raise ValueError("tick must be > 0")
        self.tls = tls  # a server context: the simulator speaks HTTPS
        self.host = host
        self.port = port
        self.seed = seed
        self.auto = auto
        self.tick_seconds = float(tick)
        self.random = random.Random(seed)
        self._lock = threading.RLock()
        self._log_lock = threading.Lock()
        self._requests: deque[RecordedRequest] = deque(maxlen=REQUEST_LOG_SIZE)
        self._faults: dict[str, _ActiveFault] = {}
        self._stopping = threading.Event()
        self._life_lock = threading.Lock()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._routes = self.routes()
        self._control_routes = self._base_control_routes() + self.control_routes()

    # --- what a provider defines ----------------------------------------------------------------

    def routes(self) -> list[Route]:
        return []

    def control_routes(self) -> list[Route]:
        """Provider-specific `/_sim/...` routes, on top of the shared ones."""
        return []

    def tick(self) -> None:
        """Evolves the state by one step; the background ticker calls this when auto=True."""

    def state(self) -> dict[str, Any]:
        return {}

    def credentials(self) -> dict[str, str]:
        """The headers this simulator accepts, for people who point a client at it."""
        return {}

    def check(self, request: RecordedRequest, headers: dict[str, str]) -> Response | None:
        """Auth and rate limits: a Response refuses the request; `headers` go on the answer."""
        return None

    def error_response(self, code: int, endpoint: str) -> Response:
        """The provider's own answer for an HTTP error code, used by `Fault.status`."""
        return json_response(code, {"error": phrase(code)})

    def rate_limited_response(self, retry_after: float) -> Response:
        return json_response(429, {"error": "Too Many Requests"})

    def provider_error_response(self, endpoint: str, message: str | None) -> Response:
        return json_response(200, {"success": False, "message": message or "error"})

    def wrong_shape(self, endpoint: str) -> Any:
        """Valid JSON that the endpoint's documented parser must refuse."""
        return [{"unexpected": "shape"}]

    def not_found(self, request: RecordedRequest) -> Response:
        return json_response(404, {"error": "Not Found"})

    def method_not_allowed(self, request: RecordedRequest, allowed: list[str]) -> Response:
        return json_response(405, {"error": "Method Not Allowed"})

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Simulator:
        with self._life_lock:
            if self._server is not None:
                raise RuntimeError(f"{self.name} simulator already started")
            self._server = _Server((self.host, self.port), self)
            self.port = self._server.server_address[1]
            self._wake_reader, self._wake_writer = socket.socketpair()
            serve = threading.Thread(
                target=self._serve_forever,
                name=f"sim-{self.name}-http",
                daemon=True,
            )
            serve.start()
            self._threads.append(serve)
            if self.auto:
                ticker = threading.Thread(
                    target=self._tick_loop, name=f"sim-{self.name}-tick", daemon=True
                )
                ticker.start()
                self._threads.append(ticker)
            log.info("%s simulator listening on %s", self.name, self.url)
        return self

    def stop(self) -> None:
        with self._life_lock:
            if self._server is None or self._stopping.is_set():
                return
            self._stopping.set()
            self._wake_writer.send(b"\0")
            self._threads[0].join(timeout=1.0)
            self._server.server_close()
            self._wake_reader.close()
            self._wake_writer.close()
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                _hang_up(conn)
            for thread in self._threads:
                thread.join(timeout=1.0)
            self.on_stop()

    def _serve_forever(self) -> None:
        """Like serve_forever, but woken by stop() at once rather than by polling all the time."""
        assert self._server is not None
        self._server.timeout = 0
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._server and not self._stopping.is_set():
                        self._server.handle_request()

    def on_stop(self) -> None:
        """Hook for providers that run more threads (webhook delivery)."""

    def __enter__(self) -> Simulator:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{self.name} simulator not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + self.base_path

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.endpoint for r in self._routes))

    def endpoint_of(self, method: str, path: str) -> str | None:
        """The endpoint that answers `method path` (relative to base_url), if any."""
        matched, _, _ = self._match(method, self.base_path + path)
        return matched.endpoint if matched else None

    def _tick_loop(self) -> None:
        while not self._stopping.wait(self.tick_seconds):
            try:
                self.tick()
            except Exception:
                log.exception("%s: tick failed", self.name)

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
        if self._stopping.is_set():
            _hang_up(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    # --- requests and faults --------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._log_lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._requests.clear()

    def fail(self, endpoint: str, fault: Fault, times: int | None = None) -> None:
        """Makes `endpoint` ("*": all) misbehave for its next `times` requests, or until cleared."""
        if endpoint != "*" and endpoint not in self.endpoints:
            raise ValueError(
                f"unknown endpoint {endpoint!r} for {self.name}; known: "
                f"{', '.join(self.endpoints)} (or '*')"
            )
        if not isinstance(fault, Fault):
            raise TypeError("fault must be a Fault")
        if times is not None and (
            isinstance(times, bool) or not isinstance(times, int) or times < 1
        ):
            raise ValueError(f"times must be a positive integer or None, got {times!r}")
        with self._lock:
            self._faults[endpoint] = _ActiveFault(fault, times)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            for key in (endpoint, "*"):
                active = self._faults.get(key)
                if active is None:
                    continue
                if active.remaining is not None:
                    active.remaining -= 1
                    if active.remaining <= 0:
                        del self._faults[key]
                return active.fault
        return None

    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        allowed: list[str] = []
        for candidate in self._routes:
            found = candidate.pattern.match(path)
            if found is None:
                continue
            if candidate.method == method:
                return candidate, {k: unquote(v) for k, v in found.groupdict().items()}, []
            allowed.append(candidate.method)
        return None, {}, allowed

    def _serve(self, request: RecordedRequest) -> Response:
        matched, params, allowed = self._match(request.method, request.path)
        if matched is not None:
            request = _with_endpoint(request, matched.endpoint)
        with self._log_lock:
            self._requests.append(request)
        log.debug("%s: %s %s -> %s", self.name, request.method, request.path, request.endpoint)
        if matched is None:
            if allowed:
                return self.method_not_allowed(request, allowed)
            return self.not_found(request)
        fault = self._take_fault(matched.endpoint)
        if fault is not None:
            answer = self._apply_fault(fault, request, matched, params)
            if answer is not None:
                return answer
        headers: dict[str, str] = {}
        refused = self.check(request, headers)
        response = refused if refused is not None else matched.handler(request, **params)
        response.headers = {**headers, **response.headers}
        return response

    def _apply_fault(
        self, fault: Fault, request: RecordedRequest, matched: Route, params: dict[str, str]
    ) -> Response | None:
        kind = fault.kind
        if kind == "latency":
            self._stopping.wait(fault.seconds)
            return None
        if kind == "timeout":
            self._stopping.wait(fault.seconds)
            return DROP
        if kind == "status":
            if fault.body is None:
                return self.error_response(fault.code, matched.endpoint)
            if isinstance(fault.body, str):
                return Response(fault.code, fault.body.encode(), _guess_type(fault.body))
            return json_response(fault.code, fault.body)
        if kind == "rate_limited":
            answer = self.rate_limited_response(fault.retry_after)
            answer.headers["Retry-After"] = str(math.ceil(fault.retry_after))
            return answer
        if kind == "html_502":
            return text_response(502, NGINX_502, "text/html")
        if kind == "malformed_json":
            body = matched.handler(request, **params).body
            return Response(200, _truncate(body), "application/json")
        if kind == "wrong_shape":
            return json_response(200, self.wrong_shape(matched.endpoint))
        if kind == "provider_error":
            return self.provider_error_response(matched.endpoint, fault.message)
        raise AssertionError(f"unhandled fault kind {kind}")

    # --- control API ----------------------------------------------------------------------------

    def _base_control_routes(self) -> list[Route]:
        p = CONTROL_PREFIX
        return [
            route("GET", p + "/requests", "", self._ctl_requests),
            route("DELETE", p + "/requests", "", self._ctl_clear_requests),
            route("GET", p + "/faults", "", self._ctl_faults),
            route("POST", p + "/faults", "", self._ctl_add_fault),
            route("DELETE", p + "/faults", "", self._ctl_clear_faults),
            route("GET", p + "/state", "", lambda _r: json_response(200, self._state_view())),
            route("POST", p + "/tick", "", self._ctl_tick),
        ]

    def _control(self, request: RecordedRequest) -> Response:
        allowed: list[str] = []
        for candidate in self._control_routes:
            found = candidate.pattern.match(request.path)
            if found is None:
                continue
            if candidate.method != request.method:
                allowed.append(candidate.method)
                continue
            params = {k: unquote(v) for k, v in found.groupdict().items()}
            try:
                return candidate.handler(request, **params)
            except ControlError as exc:
                return json_response(400, {"error": str(exc)})
            except KeyError as exc:
                return json_response(404, {"error": str(exc.args[0]) if exc.args else "not found"})
            except (ValueError, TypeError) as exc:
                return json_response(400, {"error": str(exc)})
        if allowed:
            answer = json_response(405, {"error": f"use {' or '.join(allowed)} on {request.path}"})
            answer.headers["Allow"] = ", ".join(allowed)
            return answer
        return json_response(404, {"error": f"no control endpoint {request.path}"})

    def _state_view(self) -> dict[str, Any]:
        with self._lock:
            return {"provider": self.name, "seed": self.seed, **self.state()}

    def _ctl_requests(self, _request: RecordedRequest) -> Response:
        recorded = self.requests
        return json_response(
            200,
            {
                "total": len(recorded),
                "requests": [r.to_dict() for r in recorded[-CONTROL_REQUEST_LIMIT:]],
            },
        )

    def _ctl_clear_requests(self, _request: RecordedRequest) -> Response:
        with self._log_lock:
            cleared = len(self._requests)
            self._requests.clear()
        return json_response(200, {"cleared": cleared})

    def _ctl_faults(self, _request: RecordedRequest) -> Response:
        with self._lock:
            faults = [
                {"endpoint": name, "times": active.remaining, **active.fault.to_dict()}
                for name, active in self._faults.items()
            ]
        return json_response(200, {"faults": faults})

    def _ctl_add_fault(self, request: RecordedRequest) -> Response:
        data = control_json(request)
        endpoint = data.pop("endpoint", None)
        if not isinstance(endpoint, str):
            raise ControlError(f"'endpoint' is required: one of {', '.join(self.endpoints)} or '*'")
        times = data.pop("times", None)
        fault = Fault.from_dict(data)
        self.fail(endpoint, fault, times)
        return json_response(201, {"endpoint": endpoint, "times": times, **fault.to_dict()})

    def _ctl_clear_faults(self, _request: RecordedRequest) -> Response:
        self.clear_faults()
        return json_response(200, {"faults": []})

    def _ctl_tick(self, _request: RecordedRequest) -> Response:
        self.tick()
        return json_response(200, self._state_view())


def control_json(request: RecordedRequest) -> dict[str, Any]:
    """The JSON object a control request carries, or a ControlError saying why not."""
    if not request.body.strip():
        raise ControlError("expected a JSON object body")
    try:
        data = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ControlError("body must be a JSON object")
    return data


def read_json(body: bytes) -> Any:
    """Parses a request body; raises ValueError with a readable reason."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc)) from None


def _with_endpoint(request: RecordedRequest, endpoint: str) -> RecordedRequest:
    return RecordedRequest(
        request.method,
        request.path,
        request.query,
        request.headers,
        request.body,
        request.time,
        endpoint,
    )


def _hang_up(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def _guess_type(text: str) -> str:
    try:
        json.loads(text)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/json"


def _truncate(body: bytes) -> bytes:
    """Cuts a JSON answer in half, as a proxy that drops the connection would."""
    cut = body[: max(1, len(body) // 2)]
    try:
        json.loads(cut)
    except ValueError:
        return cut
    return b'{"success": tr'
