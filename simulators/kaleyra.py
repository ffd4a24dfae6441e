"""Kaleyra (`https://api-webhook-monitor-whatsapp.api.kaleyra.io`): WhatsApp client stats.

The payload is Meta's on-premises WhatsApp Business API client stats, passed through by Kaleyra in
its own envelope. Served to whitelisted IPs without auth, so `required_headers` is off by default.
Family names differ between client versions, and multi-node setups nest the `db` section per node:
both are options, so the exporter's translation is tested against each shape.
"""

from __future__ import annotations

import re
from typing import Any

from simulators.kit import Demo, Example, FaultAnswers, Kit, Matrix, Probe
from simulators.server import (
    CONTROL_PREFIX,
    RecordedRequest,
    Response,
    Route,
    Simulator,
    control_json,
    json_response,
    phrase,
    route,
)

E164 = re.compile(r"\+[1-9]\d{6,14}")
NODES = ("host1:abc123", "host2:def456")
ACCEPTABLE = {"*/*", "application/*", "application/json"}

Labels = tuple[tuple[str, str], ...]

# name -> (section, type, help, label sets the family starts with)
FAMILIES: dict[str, tuple[str, str, str, tuple[Labels, ...]]] = {
    "callback_queue_size": ("app", "gauge", "Current callback queue size", ((),)),
    "callback_requests_duration_ms_count": (
        "app",
        "counter",
        "Callback request duration in milliseconds (count)",
        (
            (("result", "success"), ("type", "inbound_message")),
            (("result", "99"), ("type", "status_change")),
            (("result", "success"), ("type", "status_change")),
        ),
    ),
    "callback_requests_duration_ms_sum": (
        "app",
        "counter",
        "Callback request duration in milliseconds (sum)",
        (
            (("result", "success"), ("type", "inbound_message")),
            (("result", "99"), ("type", "status_change")),
            (("result", "success"), ("type", "status_change")),
        ),
    ),
    "concurrent_rate_limit_triggered": (
        "app",
        "counter",
        "Number of times the concurrent request rate limit was hit",
        ((),),
    ),
    "db_request_duration_us_count": (
        "app",
        "counter",
        "Database request duration in microseconds (count)",
        (
            (("db", "coreapp"), ("request", "select")),
            (("db", "coreapp"), ("request", "insert")),
            (("db", "coreapp"), ("request", "update")),
        ),
    ),
    "db_request_duration_us_sum": (
        "app",
        "counter",
        "Database request duration in microseconds (sum)",
        (
            (("db", "coreapp"), ("request", "select")),
            (("db", "coreapp"), ("request", "insert")),
            (("db", "coreapp"), ("request", "update")),
        ),
    ),
    "endpoint_requests": (
        "app",
        "counter",
        "Number of requests per endpoint",
        (
            (("method", "POST"), ("request", "/v1/messages"), ("status", "201")),
            (("method", "POST"), ("request", "/v1/messages"), ("status", "400")),
            (("method", "POST"), ("request", "/v1/contacts"), ("status", "200")),
            (("method", "GET"), ("request", "/v1/health"), ("status", "200")),
        ),
    ),
    "in_message_decoded": ("app", "counter", "Number of inbound messages decoded", ((),)),
    "in_messages_pending_processing": (
        "app",
        "gauge",
        "Inbound messages waiting to be processed",
        ((),),
    ),
    "media_downloads": (
        "app",
        "counter",
        "Number of media downloads",
        ((("result", "success"),), (("result", "error"),)),
    ),
    "media_uploads": (
        "app",
        "counter",
        "Number of media uploads",
        ((("result", "success"),), (("result", "error"),)),
    ),
    "out_message_persisted": ("app", "counter", "Number of outbound messages persisted", ((),)),
    "out_message_sent_duration_ms_count": (
        "app",
        "counter",
        "Outbound message send duration in milliseconds (count)",
        ((),),
    ),
    "out_message_sent_duration_ms_sum": (
        "app",
        "counter",
        "Outbound message send duration in milliseconds (sum)",
        ((),),
    ),
    "out_message_status": (
        "app",
        "counter",
        "Outbound message status updates",
        tuple((("status", s),) for s in ("sent", "delivered", "read", "failed")),
    ),
    "pending_callbacks": ("app", "gauge", "Callbacks waiting to be sent", ((),)),
    "pending_messages": ("app", "gauge", "Outbound messages waiting to be sent", ((),)),
    "db_contacts": (
        "db",
        "gauge",
        "Contacts stored in the database",
        tuple((("type", t),) for t in ("valid", "invalid", "processing")),
    ),
    "db_message_receipts": ("db", "gauge", "Message receipts stored in the database", ((),)),
    "db_messages": (
        "db",
        "gauge",
        "Messages stored in the database",
        ((("type", "inbound"),), (("type", "outbound"),)),
    ),
    "db_pending_callbacks": ("db", "gauge", "Callbacks pending in the database", ((),)),
    "db_pending_messages": ("db", "gauge", "Messages pending in the database", ((),)),
}
# Where a fresh number's counters start: rare events get small numbers.
INITIAL_HIGH = {
    "concurrent_rate_limit_triggered": 30,
    "media_downloads": 2_000,
    "media_uploads": 1_000,
    "db_contacts": 50_000,
    "db_message_receipts": 200_000,
    "db_messages": 100_000,
}
OLD_CALLBACKS = "callback_requests"
SETTABLE = tuple(
    name for name, (_, kind, _, labels) in FAMILIES.items() if kind == "gauge" and labels == ((),)
)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "error": {}, "data": []}


WS406 = _error("WS406", "The accept header mismatches the supported server response!")
WS500 = _error("WS500", "somthing went wrong !!!")


class KaleyraSimulator(Simulator):
    """`wrapper`, `multinode` and `client_version` pick which of the shapes seen in the wild to
    answer with; `required_headers` stands in for the IP whitelist."""

    name = "kaleyra"
    base_path = ""
    server_header = "nginx"

    def __init__(
        self,
        *,
        numbers: list[str] | tuple[str, ...] = ("+12025550100",),
        wrapper: bool = True,
        multinode: bool = False,
        client_version: str = "new",
        required_headers: dict[str, str] | None = None,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if client_version not in ("new", "old"):
            raise ValueError("client_version must be 'new' or 'old'")
        self.wrapper = wrapper
        self.multinode = multinode
        self.client_version = client_version
        self.required_headers = {k.lower(): v for k, v in (required_headers or {}).items()}
        self._stats: dict[str, dict[str, dict[Labels, float]]] = {}
        for number in numbers:
            self.add_number(number)

    # --- explicit state changes -----------------------------------------------------------------

    @property
    def numbers(self) -> list[str]:
        with self._lock:
            return list(self._stats)

    def add_number(self, number: str) -> None:
        if not E164.fullmatch(number):
            raise ValueError(f"{number!r} is not an E.164 number")
        rng = self.random
        with self._lock:
            if number in self._stats:
                raise ValueError(f"number {number} already exists")
            stats: dict[str, dict[Labels, float]] = {}
            for name, (_, kind, _, label_sets) in FAMILIES.items():
                high = INITIAL_HIGH.get(name, 100_000 if kind == "counter" else 20)
                stats[name] = {labels: rng.randint(0, high) for labels in label_sets}
            for key, count in stats["callback_requests_duration_ms_count"].items():
                stats["callback_requests_duration_ms_sum"][key] = count * rng.randint(20, 90)
            for key, count in stats["db_request_duration_us_count"].items():
                stats["db_request_duration_us_sum"][key] = count * rng.randint(300, 3000)
            count = stats["out_message_sent_duration_ms_count"][()]
            stats["out_message_sent_duration_ms_sum"][()] = count * rng.randint(80, 400)
            self._stats[number] = stats

    def remove_number(self, number: str) -> None:
        with self._lock:
            if number not in self._stats:
                raise KeyError(f"unknown number {number}")
            del self._stats[number]

    def set_gauge(self, number: str, name: str, value: float) -> None:
        _check_gauge(name, value)
        with self._lock:
            if number not in self._stats:
                raise KeyError(f"unknown number {number}")
            self._stats[number][name][()] = value

    def value(self, number: str, name: str, **labels: str) -> float:
        """One sample's current value, for tests that assert the exporter reports it."""
        with self._lock:
            return self._stats[number][name][tuple(labels.items())]

    def tick(self) -> None:
        rng = self.random
        with self._lock:
            for stats in self._stats.values():
                self._tick_number(stats, rng)

    @staticmethod
    def _tick_number(stats: dict[str, dict[Labels, float]], rng: Any) -> None:
        def add(name: str, amount: float, **labels: str) -> None:
            key = tuple(labels.items())
            stats[name][key] = stats[name].get(key, 0) + amount

        def walk(name: str, step: int) -> None:
            stats[name][()] = max(0, stats[name][()] + rng.randint(-step, step))

        sent = rng.randint(0, 20)
        delivered = sum(rng.random() < 0.97 for _ in range(sent))
        read = sum(rng.random() < 0.6 for _ in range(delivered))
        received = rng.randint(0, 8)
        add("out_message_persisted", sent)
        add("out_message_sent_duration_ms_count", sent)
        add("out_message_sent_duration_ms_sum", sum(rng.randint(50, 600) for _ in range(sent)))
        add("out_message_status", sent, status="sent")
        add("out_message_status", delivered, status="delivered")
        add("out_message_status", read, status="read")
        add("out_message_status", sent - delivered, status="failed")
        add("endpoint_requests", sent, method="POST", request="/v1/messages", status="201")
        add(
            "endpoint_requests", rng.randint(0, 2), method="GET", request="/v1/health", status="200"
        )
        add("in_message_decoded", received)
        callbacks = {
            ("success", "inbound_message"): received,
            ("success", "status_change"): delivered + read,
            ("99", "status_change"): int(rng.random() < 0.05),
        }
        for (result, kind), count in callbacks.items():
            add("callback_requests_duration_ms_count", count, result=result, type=kind)
            add(
                "callback_requests_duration_ms_sum",
                count * rng.randint(20, 90),
                result=result,
                type=kind,
            )
        for request, count in (
            ("select", sent * 3 + received),
            ("insert", sent + received),
            ("update", delivered + read),
        ):
            add("db_request_duration_us_count", count, db="coreapp", request=request)
            add(
                "db_request_duration_us_sum",
                count * rng.randint(300, 3000),
                db="coreapp",
                request=request,
            )
        add("media_uploads", rng.randint(0, 1), result="success")
        add("media_downloads", rng.randint(0, 2), result="success")
        add("concurrent_rate_limit_triggered", int(rng.random() < 0.02))
        add("db_messages", sent, type="outbound")
        add("db_messages", received, type="inbound")
        add("db_message_receipts", delivered + read)
        add("db_contacts", int(rng.random() < 0.3), type="valid")
        # The callback queue fills in bursts when the receiver is slow and drains between them.
        queue_size = stats["callback_queue_size"][()]
        if rng.random() < 0.1:
            queue_size += rng.randint(50, 400)
        else:
            queue_size = max(0, queue_size - rng.randint(5, 60))
        stats["callback_queue_size"][()] = queue_size
        stats["pending_callbacks"][()] = min(queue_size, rng.randint(0, 10) + queue_size // 10)
        stats["db_pending_callbacks"][()] = stats["pending_callbacks"][()]
        walk("pending_messages", 3)
        walk("in_messages_pending_processing", 2)
        stats["db_pending_messages"][()] = stats["pending_messages"][()]

    def state(self) -> dict[str, Any]:
        return {
            "wrapper": self.wrapper,
            "multinode": self.multinode,
            "client_version": self.client_version,
            "numbers": {number: self._payload(number) for number in self._stats},
        }

    def credentials(self) -> dict[str, str]:
        return dict(self.required_headers)

    # --- HTTP -----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            route("GET", r"/v1/wamonitor/stats/(?P<number>[^/]+)", "monitor_stats", self._monitor)
        ]

    def control_routes(self) -> list[Route]:
        return [route("POST", CONTROL_PREFIX + r"/numbers/(?P<number>[^/]+)", "", self._ctl_number)]

    def check(self, request: RecordedRequest, headers: dict[str, str]) -> Response | None:
        for name, value in self.required_headers.items():
            if request.headers.get(name) != value:
                return json_response(401, _error("WS401", "Unauthorized"))
        if not _accepts_json(request.headers.get("accept")):
            return json_response(406, WS406)
        return None

    def _monitor(self, _request: RecordedRequest, number: str) -> Response:
        with self._lock:
            if number not in self._stats:
                return json_response(500, WS500)
            stats = self._payload(number)
        return json_response(200, self._envelope(stats))

    def _envelope(self, stats: Any) -> dict[str, Any]:
        answer = {
            "code": "WS201",
            "message": "Requested processed successfully",
            "error": {},
            "data": {"stats": stats},
        }
        return {"RESPONSE": answer} if self.wrapper else answer

    def _payload(self, number: str) -> dict[str, Any]:
        sections: dict[str, dict[str, Any]] = {"app": {}, "db": {}}
        stats = self._stats[number]
        for name, (section, kind, help_text, _) in FAMILIES.items():
            if self.client_version == "old" and name.startswith("callback_requests_duration"):
                continue
            sections[section][name] = _family(kind, help_text, stats[name])
        if self.client_version == "old":
            counts = stats["callback_requests_duration_ms_count"]
            sections["app"][OLD_CALLBACKS] = _family(
                "counter", "Number of callback requests", counts
            )
        if self.multinode:
            sections["db"] = {NODES[0]: sections["db"], NODES[1]: {}}
        return sections

    # --- provider-specific answers to faults ----------------------------------------------------

    def error_response(self, code: int, endpoint: str) -> Response:
        if code == 406:
            return json_response(406, WS406)
        if code == 500:
            return json_response(500, WS500)
        return json_response(code, _error(f"WS{code}", phrase(code)))

    def rate_limited_response(self, retry_after: float) -> Response:
        return json_response(429, _error("WS429", "Too Many Requests"))

    def provider_error_response(self, endpoint: str, message: str | None) -> Response:
        return json_response(200, _error("WS500", message or WS500["message"]))

    def wrong_shape(self, endpoint: str) -> Any:
        return self._envelope([{"app": {"callback_queue_size": "12"}}])

    def not_found(self, request: RecordedRequest) -> Response:
        return json_response(404, _error("WS404", "Requested resource not found!"))

    def method_not_allowed(self, request: RecordedRequest, allowed: list[str]) -> Response:
        answer = json_response(405, _error("WS405", "Method not allowed!"))
        answer.headers["Allow"] = ", ".join(allowed)
        return answer

    # --- control --------------------------------------------------------------------------------

    def _ctl_number(self, request: RecordedRequest, number: str) -> Response:
        gauges = control_json(request)
        unknown = sorted(set(gauges) - set(SETTABLE))
        if unknown:
            raise ValueError(f"not settable: {unknown}; settable gauges: {', '.join(SETTABLE)}")
        for name, value in gauges.items():
            _check_gauge(name, value)
        with self._lock:
            created = number not in self._stats
            if created:
                self.add_number(number)
            for name, value in gauges.items():
                self.set_gauge(number, name, value)
            current = {name: self._stats[number][name][()] for name in SETTABLE}
        return json_response(201 if created else 200, {"number": number, "gauges": current})


def _check_gauge(name: str, value: Any) -> None:
    if name not in SETTABLE:
        raise ValueError(f"{name!r} is not a settable gauge; one of {', '.join(SETTABLE)}")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def _family(kind: str, help_text: str, samples: dict[Labels, float]) -> dict[str, Any]:
    data = [
        {"labels": dict(labels), "value": value} if labels else {"value": value}
        for labels, value in samples.items()
    ]
    return {"data": data, "help": help_text, "type": kind}


def _accepts_json(accept: str | None) -> bool:
    if accept is None or not accept.strip():
        return True
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = next((p.split("=", 1)[1] for p in params if p.startswith("q=")), "1")
        try:
            acceptable = float(quality) > 0
        except ValueError:
            acceptable = True
        if acceptable and media.lower() in ACCEPTABLE:
            return True
    return False


DEMO_NUMBERS = ("+12025550100", "+12025550101")


def _demo_accounts(base_url: str) -> str:
    numbers = ", ".join(f'"{n}"' for n in DEMO_NUMBERS)
    return f"""\
kaleyra:
  - account: demo
    base_url: {base_url}
    numbers: [{numbers}]
"""


KIT = Kit(
    name="kaleyra",
    simulator=KaleyraSimulator,
    quick={"numbers": ["+12025550100"]},
    probe=Probe(
        endpoint="monitor_stats",
        method="GET",
        path="/v1/wamonitor/stats/+12025550100",
        misshapen=lambda body: not isinstance(body["RESPONSE"]["data"]["stats"], dict),
    ),
    demo=Demo(
        options={"numbers": list(DEMO_NUMBERS)},
        accounts=_demo_accounts,
        metric="whatsapp_client_app_callback_queue_size",
    ),
    faults=FaultAnswers(
        auth=(
            403,
            "application/json",
            {"code": "WS403", "message": "Forbidden", "error": {}, "data": []},
        ),
        rate_limited={"code": "WS429", "message": "Too Many Requests", "error": {}, "data": []},
        not_found=lambda method, path: {
            "code": "WS404",
            "message": "Requested resource not found!",
            "error": {},
            "data": [],
        },
        valid={
            "monitor_stats": {
                "RESPONSE": {
                    "code": "WS201",
                    "message": "Requested processed successfully",
                    "error": {},
                    "data": {
                        "stats": {
                            "app": {
                                "callback_queue_size": {
                                    "data": [{"value": 0}],
                                    "help": "Current callback queue size",
                                    "type": "gauge",
                                }
                            }
                        }
                    },
                }
            }
        },
        # `data.stats` a list where the object of sections belongs
        wrong_shape=lambda junk: {
            "RESPONSE": {
                "code": "WS201",
                "message": "\ud800",
                "error": {},
                "data": {"stats": [junk]},
            }
        },
        huge_chunked=True,
    ),
    matrix=Matrix(
        prefix="ky",
        endpoints=("monitor_stats",),
        keys=lambda account, interval, healthy: {"numbers": ["+12025550100"]},
    ),
    example=Example(account="main"),
    dashboard="whatsapp-kaleyra-client",
    alerts=("WhatsAppClientCallbackQueueGrowing", "WhatsAppClientPendingMessagesGrowing"),
)
