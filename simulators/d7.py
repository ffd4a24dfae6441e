"""D7 Networks (`https://api.d7networks.com`): WhatsApp sends, their reports and delivery webhooks.

A FastAPI service: errors come as `{"detail": ...}`, auth is checked before the path is validated.
Nothing lists request ids, so the simulator also accepts sends; each message then walks through
processed -> sent -> delivered -> read (or un_delivered / rejected) on the ticker, and every step
can be pushed to a webhook the way D7 calls an account's callback URL.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from simulators.kit import Demo, Example, FaultAnswers, Kit, Matrix, Probe
from simulators.server import (
    CONTROL_PREFIX,
    RecordedRequest,
    Response,
    Route,
    Simulator,
    check_probabilities,
    control_json,
    json_response,
    log,
    read_json,
    route,
)

REASONS = {
    "processed": "Message is processed",
    "scheduled": "Message scheduled",
    "sent": "Sent to telecom and awaiting acknowledgement",
    "delivered": "Delivered to destination and confirmed",
    "un_delivered": "Failed delivery",
    "rejected": "Rejected the message",
    "insufficient_credit": "User does not have enough credit",
    "read": "Read by the user",
}
FINAL = frozenset({"read", "un_delivered", "rejected", "insufficient_credit"})
REFERENCE_FIELDS = (
    "cust_ref",
    "message_tag1",
    "message_tag2",
    "message_tag3",
    "message_tag4",
    "message_tag5",
    "conversation_id",
)
NOT_EXISTS = {
    "detail": {
        "code": "WHATSAPP_LOG_NOT_EXISTS",
        "message": "Given whatsapp message request id not exists in the system. Please Try Again!",
    }
}
BAD_TOKEN = {
    "detail": {
        "code": "ACCESS_TOKEN_SIGNATURE_VERIFICATION_FAILED",
        "message": "It looks like your requested access token is invalid. Please check your "
        "access token and try again.",
    }
}
WEBHOOK_TIMEOUT = 2.0


@dataclass
class Message:
    msg_id: str
    originator: str
    recipient: str
    reference: dict[str, str | None]
    conversation_type: str
    message_type: str
    template_id: str | None
    wa_conv_id: str
    sent_at: float
    report_url: str | None
    status: str = "processed"
    next_at: float = 0.0
    will_read: bool = False
    history: list[tuple[str, float]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {
            "msg_id": self.msg_id,
            "originator": self.originator,
            "recipient": self.recipient,
            "reference": dict(self.reference),
            "conversation_type": self.conversation_type,
            "message_type": self.message_type,
            "template_id": self.template_id,
            "waConvId": self.wa_conv_id,
            "status": self.status,
            "reason": REASONS[self.status],
        }


@dataclass(frozen=True)
class MessageStatus:
    """A message's state as a test sees it: `history` holds (status, time.time()) pairs."""

    request_id: str
    msg_id: str
    recipient: str
    status: str
    sent_at: float
    updated_at: float
    history: tuple[tuple[str, float], ...]


@dataclass
class _Request:
    request_id: str
    created_at: float
    messages: list[Message]


class D7Simulator(Simulator):
    """`index_delay` reproduces the 404 a just-sent request gets while D7 indexes it; `send_rate`
    (requests per tick) makes traffic of its own, so webhooks flow without a sender."""

    name = "d7"
    base_path = ""
    server_header = "uvicorn"

    RETENTION = 7 * 86400

    def __init__(
        self,
        *,
        token: str = "demo-token",
        index_delay: float = 2.0,
        p_undelivered: float = 0.05,
        p_rejected: float = 0.02,
        p_read: float = 0.6,
        sent_delay: float = 1.0,
        delivered_delay: float = 2.0,
        read_delay: float = 5.0,
        send_rate: float = 0.0,
        webhook_url: str | None = None,
        webhook_headers: dict[str, str] | None = None,
        webhook_nested_reference: bool = False,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        check_probabilities(p_undelivered=p_undelivered, p_rejected=p_rejected, p_read=p_read)
        self.token = token
        self.index_delay = float(index_delay)
        self.p_undelivered = p_undelivered
        self.p_rejected = p_rejected
        self.p_read = p_read
        self.delays = {"sent": sent_delay, "delivered": delivered_delay, "read": read_delay}
        self.send_rate = send_rate
        self.webhook_url = webhook_url
        self.webhook_headers = dict(webhook_headers or {})
        self.webhook_nested_reference = webhook_nested_reference
        self._requests_by_id: dict[str, _Request] = {}
        self._outbox: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._courier: threading.Thread | None = None

    # --- explicit state changes -----------------------------------------------------------------

    def send(
        self,
        recipients: int | list[str] = 1,
        *,
        conversation_type: str = "marketing",
        message_type: str = "TEMPLATE",
        originator: str = "+15550100100",
        template_id: str | None = "marketing",
        reference: dict[str, str] | None = None,
        report_url: str | None = None,
    ) -> str:
        """Accepts a request as `POST /whatsapp/v2/send` would; returns its request_id."""
        if isinstance(recipients, bool) or not isinstance(recipients, int | list | tuple):
            raise ValueError("recipients must be a count or a list of numbers")
        if isinstance(recipients, int):
            with self._lock:
                numbers = [f"+4917{self.random.randrange(10**9):09d}" for _ in range(recipients)]
        else:
            numbers = [str(r) for r in recipients]
        if not numbers:
            raise ValueError("at least one recipient is needed")
        return self._accept(
            [
                {
                    "originator": originator,
                    "recipient": number,
                    "reference": dict(reference or {}),
                    "conversation_type": conversation_type,
                    "message_type": message_type,
                    "template_id": template_id,
                    "report_url": report_url,
                }
                for number in numbers
            ]
        )

    def advance(self, request_id: str, status: str, msg_id: str | None = None) -> None:
        """Moves every message of a request (or one, by msg_id) to `status`, as a provider would."""
        if status not in REASONS:
            raise ValueError(f"status must be one of {', '.join(REASONS)}")
        now = time.time()
        with self._lock:
            found = self._requests_by_id.get(request_id)
            if found is None:
                raise KeyError(f"unknown request_id {request_id}")
            targets = [m for m in found.messages if msg_id is None or m.msg_id == msg_id]
            if not targets:
                raise KeyError(f"unknown msg_id {msg_id}")
            for message in targets:
                self._set_status(found, message, status, now)

    def messages(self, request_id: str) -> list[MessageStatus]:
        with self._lock:
            found = self._requests_by_id.get(request_id)
            if found is None:
                raise KeyError(f"unknown request_id {request_id}")
            return [
                MessageStatus(
                    request_id,
                    m.msg_id,
                    m.recipient,
                    m.status,
                    m.sent_at,
                    m.history[-1][1],
                    tuple(m.history),
                )
                for m in found.messages
            ]

    @property
    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._requests_by_id)

    def tick(self, now: float | None = None) -> None:
        """Advances every message whose next step is due; `now` lets a test jump ahead in time."""
        now = time.time() if now is None else now
        rng = self.random
        with self._lock:
            sends = int(self.send_rate) + (rng.random() < self.send_rate % 1)
            for _ in range(sends):
                self.send(
                    rng.randint(1, 3),
                    conversation_type=rng.choice(("marketing", "marketing", "utility", "service")),
                )
            for request in list(self._requests_by_id.values()):
                if now - request.created_at > self.RETENTION:
                    del self._requests_by_id[request.request_id]
                    continue
                for message in request.messages:
                    if message.status in FINAL or message.next_at > now:
                        continue
                    following = self._next_status(message)
                    if following is not None:
                        self._set_status(request, message, following, now)

    def _next_status(self, message: Message) -> str | None:
        rng = self.random
        if message.status in ("processed", "scheduled"):
            return "rejected" if rng.random() < self.p_rejected else "sent"
        if message.status == "sent":
            return "un_delivered" if rng.random() < self.p_undelivered else "delivered"
        if message.status == "delivered" and message.will_read:
            return "read"
        return None

    def _set_status(self, request: _Request, message: Message, status: str, now: float) -> None:
        message.status = status
        message.history.append((status, now))
        delay = self.delays.get(
            {"processed": "sent", "sent": "delivered", "delivered": "read"}.get(status, ""), 0.0
        )
        message.next_at = now + delay * self.random.uniform(0.5, 1.5)
        if status == "delivered":
            message.will_read = self.random.random() < self.p_read
        target = message.report_url or self.webhook_url
        if target:
            self._post(target, self._event(request, message, now))

    def _accept(self, specs: list[dict[str, Any]]) -> str:
        """Stores one request; each spec holds a Message's fields that the sender chooses."""
        rng = self.random
        now = time.time()
        with self._lock:
            request_id = _uuid4(rng)
            messages = []
            for spec in specs:
                reference = spec["reference"]
                message = Message(
                    msg_id=_uuid4(rng),
                    wa_conv_id=f"{rng.getrandbits(128):032x}",
                    sent_at=now,
                    **{**spec, "reference": {k: reference.get(k) for k in REFERENCE_FIELDS}},
                )
                message.history.append(("processed", now))
                message.next_at = now + self.delays["sent"] * rng.uniform(0.5, 1.5)
                messages.append(message)
            self._requests_by_id[request_id] = _Request(request_id, now, messages)
        return request_id

    def state(self) -> dict[str, Any]:
        return {
            "index_delay": self.index_delay,
            "webhook_url": self.webhook_url,
            "requests": [
                {
                    "request_id": r.request_id,
                    "created_at": _iso(r.created_at),
                    "messages": [
                        {"msg_id": m.msg_id, "status": m.status, "sent_at": m.sent_at}
                        for m in r.messages
                    ],
                }
                for r in list(self._requests_by_id.values())[-100:]
            ],
        }

    def credentials(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # --- webhooks -------------------------------------------------------------------------------

    def _event(self, request: _Request, message: Message, now: float) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_type": "DELIVERY_EVENTS",
            "timestamp": int(now * 1000),
            "date": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "request_id": request.request_id,
            "msg_id": message.msg_id,
            "conversation_type": message.conversation_type,
            "message_type": message.message_type,
            "waConvId": message.wa_conv_id,
            "recipient": message.recipient,
        }
        if self.webhook_nested_reference:
            event["reference"] = dict(message.reference)
        else:
            event.update(message.reference)
        event["originator"] = message.originator
        event["status"] = message.status
        return event

    def _post(self, url: str, event: dict[str, Any]) -> None:
        """Queues an event for the courier thread, so a slow receiver never stalls the API."""
        if self._stopping.is_set():
            return
        if self._courier is None:
            self._courier = threading.Thread(
                target=self._deliver, name="sim-d7-webhooks", daemon=True
            )
            self._courier.start()
        self._outbox.put((url, event))

    def _deliver(self) -> None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "D7-Webhooks/1.0",
            **self.webhook_headers,
        }
        while True:
            item = self._outbox.get()
            if item is None or self._stopping.is_set():
                return
            url, event = item
            data = json.dumps(event).encode()
            try:
                post = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(post, timeout=WEBHOOK_TIMEOUT) as answer:
                    answer.read()
            except Exception as exc:  # best effort: a receiver's failure is its own
                log.warning(
                    "d7: webhook for %s (%s) not delivered: %s",
                    event["msg_id"],
                    event["status"],
                    exc,
                )

    def on_stop(self) -> None:
        if self._courier is not None:
            self._outbox.put(None)
            self._courier.join(timeout=0.2)

    # --- HTTP -----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        request_id = r"(?P<request_id>[^/]+)"
        return [
            route("GET", f"/whatsapp/v2/report/{request_id}", "report", self._report),
            route("GET", f"/whatsapp/v1/report/{request_id}", "report", self._report),
            route("POST", "/whatsapp/v2/send", "send", self._send),
        ]

    def control_routes(self) -> list[Route]:
        return [
            route("POST", CONTROL_PREFIX + "/send", "", self._ctl_send),
            route(
                "GET", CONTROL_PREFIX + r"/messages/(?P<request_id>[^/]+)", "", self._ctl_messages
            ),
            route(
                "POST", CONTROL_PREFIX + r"/messages/(?P<request_id>[^/]+)", "", self._ctl_advance
            ),
        ]

    def check(self, request: RecordedRequest, headers: dict[str, str]) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.token:
            return json_response(401, BAD_TOKEN)
        return None

    def _report(self, _request: RecordedRequest, request_id: str) -> Response:
        try:
            key = str(uuid.UUID(request_id))
        except ValueError:
            return json_response(
                422,
                {
                    "detail": [
                        {
                            "loc": ["path", "request_id"],
                            "msg": "value is not a valid uuid",
                            "type": "type_error.uuid",
                        }
                    ]
                },
            )
        with self._lock:
            found = self._requests_by_id.get(key)
            if found is None or time.time() < found.created_at + self.index_delay:
                return json_response(404, NOT_EXISTS)
            stages = {m.status for m in found.messages}
            return json_response(
                200,
                {
                    "request_id": found.request_id,
                    "messages": [m.report() for m in found.messages],
                    "request_stage": "scheduled" if stages == {"scheduled"} else "processed",
                    "schedule_time": None,
                },
            )

    def _send(self, request: RecordedRequest) -> Response:
        try:
            payload = read_json(request.body)
        except ValueError as exc:
            return _unprocessable(["body", 0], f"Expecting JSON: {exc}", "value_error.jsondecode")
        if (
            not isinstance(payload, dict)
            or not isinstance(payload.get("messages"), list)
            or not (payload["messages"])
        ):
            return _unprocessable(["body", "messages"], "field required", "value_error.missing")
        globals_ = payload.get("message_globals")
        globals_ = globals_ if isinstance(globals_, dict) else {}
        specs: list[dict[str, Any]] = []
        for index, item in enumerate(payload["messages"]):
            parsed = _parse_message(item, globals_)
            if isinstance(parsed, str):
                return _unprocessable(["body", "messages", index], parsed, "value_error")
            specs.extend(parsed)
        request_id = self._accept(specs)
        with self._lock:
            created = self._requests_by_id[request_id].created_at
        return json_response(
            200,
            {
                "request_id": request_id,
                "status": "accepted",
                "created_at": datetime.fromtimestamp(created, UTC).isoformat(),
            },
        )

    # --- provider-specific answers to faults ----------------------------------------------------

    def error_response(self, code: int, endpoint: str) -> Response:
        if code == 401:
            return json_response(401, BAD_TOKEN)
        if code == 404:
            return json_response(404, NOT_EXISTS)
        if code == 422:
            return _unprocessable(
                ["path", "request_id"], "value is not a valid uuid", "type_error.uuid"
            )
        details = {
            400: ("BAD_REQUEST", "Bad request. Please check the request and try again."),
            402: ("INSUFFICIENT_CREDIT", "You do not have enough credit to send this message."),
            500: ("INTERNAL_SERVER_ERROR", "Something went wrong. Please try again later."),
        }
        code_name, message = details.get(code, ("ERROR", "Request failed"))
        return json_response(code, {"detail": {"code": code_name, "message": message}})

    def rate_limited_response(self, retry_after: float) -> Response:
        return json_response(
            429,
            {"detail": {"code": "TOO_MANY_REQUESTS", "message": "Too many requests. Slow down."}},
        )

    def provider_error_response(self, endpoint: str, message: str | None) -> Response:
        return json_response(
            400,
            {
                "detail": {
                    "code": "BAD_REQUEST",
                    "message": message or "Bad request. Please check the request and try again.",
                }
            },
        )

    def wrong_shape(self, endpoint: str) -> Any:
        if endpoint == "send":
            return {"request_id": 12345, "status": ["accepted"]}
        return {
            "request_id": "f44e3f43-6d4e-4e46-becd-21993f3dcb8e",
            "messages": {"msg_id": "6d29d646-4e09-11ee-84f4-0242ac190006", "status": 3},
            "request_stage": 1,
            "schedule_time": None,
        }

    def not_found(self, request: RecordedRequest) -> Response:
        return json_response(404, {"detail": "Not Found"})

    def method_not_allowed(self, request: RecordedRequest, allowed: list[str]) -> Response:
        answer = json_response(405, {"detail": "Method Not Allowed"})
        answer.headers["Allow"] = ", ".join(allowed)
        return answer

    # --- control --------------------------------------------------------------------------------

    def _ctl_send(self, request: RecordedRequest) -> Response:
        data = control_json(request) if request.body.strip() else {}
        allowed = {
            "recipients",
            "conversation_type",
            "message_type",
            "originator",
            "template_id",
            "reference",
            "report_url",
        }
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown fields {unknown}; allowed: {sorted(allowed)}")
        request_id = self.send(**data)
        return json_response(201, {"request_id": request_id})

    def _ctl_messages(self, _request: RecordedRequest, request_id: str) -> Response:
        return json_response(
            200,
            {
                "request_id": request_id,
                "messages": [
                    {
                        "msg_id": m.msg_id,
                        "recipient": m.recipient,
                        "status": m.status,
                        "sent_at": m.sent_at,
                        "history": m.history,
                    }
                    for m in self.messages(request_id)
                ],
            },
        )

    def _ctl_advance(self, request: RecordedRequest, request_id: str) -> Response:
        data = control_json(request)
        status = data.get("status")
        if not isinstance(status, str):
            raise ValueError(f"'status' is required: one of {', '.join(REASONS)}")
        self.advance(request_id, status, data.get("msg_id"))
        return self._ctl_messages(request, request_id)


def _parse_message(item: Any, globals_: dict[str, Any]) -> list[dict[str, Any]] | str:
    """Reads one entry of a send's `messages` loosely; a string says what is wrong."""
    if not isinstance(item, dict):
        return "value is not a valid dict"
    recipients = item.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        return "recipients: field required"
    content = item.get("content") if isinstance(item.get("content"), dict) else {}
    message_type = str(content.get("message_type", "TEMPLATE"))
    template = content.get("template") if isinstance(content.get("template"), dict) else {}
    conversation_type = (
        item.get("conversation_type")
        or template.get("category")
        or ("marketing" if message_type == "TEMPLATE" else "service")
    )
    common = {
        "originator": str(item.get("originator") or globals_.get("originator") or ""),
        "conversation_type": str(conversation_type).lower(),
        "message_type": message_type,
        "template_id": template.get("template_id"),
        "report_url": item.get("report_url") or globals_.get("report_url"),
    }
    specs: list[dict[str, Any]] = []
    for recipient in recipients:
        if isinstance(recipient, str | int) and not isinstance(recipient, bool):
            specs.append({**common, "recipient": str(recipient), "reference": {}})
        elif isinstance(recipient, dict) and isinstance(recipient.get("recipient"), str):
            reference = recipient.get("reference")
            specs.append(
                {
                    **common,
                    "recipient": recipient["recipient"],
                    "reference": reference if isinstance(reference, dict) else {},
                }
            )
        else:
            return "recipients: each must be a number or an object with 'recipient'"
    return specs


def _unprocessable(loc: list[Any], msg: str, kind: str) -> Response:
    return json_response(422, {"detail": [{"loc": loc, "msg": msg, "type": kind}]})


def _uuid4(rng: Any) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


DEMO_INGEST_TOKEN = "demo-ingest-token"


def _demo_accounts(base_url: str) -> str:
    return f"""\
d7:
  - account: demo
    base_url: {base_url}
    token: demo-token
    ingest_token: {DEMO_INGEST_TOKEN}
    interval: 1s
    retry_first: 2s
    retry_max: 10s
    not_found_grace: 30s
"""


def _demo_traffic(sim: D7Simulator, exporter_url: str, stop: threading.Event) -> None:
    """What a sending application does: send through D7, hand the request ids to the exporter.
    D7's webhooks (from the simulator) report the same messages: each status still counts once."""
    rng = random.Random(7)
    auth = {"Authorization": f"Bearer {DEMO_INGEST_TOKEN}"}
    sim.webhook_url = f"{exporter_url}/webhooks/d7/demo"
    sim.webhook_headers = auth
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    while not stop.wait(1.0):
        ids = [
            sim.send(
                recipients=rng.randint(1, 2),
                conversation_type=rng.choice(("marketing", "utility", "service")),
                message_type=rng.choice(("TEMPLATE", "TEXT")),
            )
            for _ in range(rng.randint(1, 3))
        ]
        handed = urllib.request.Request(
            f"{exporter_url}/api/v1/requests",
            data=json.dumps({"account": "demo", "request_ids": ids}).encode(),
            headers={**auth, "Content-Type": "application/json"},
        )
        try:
            with direct.open(handed, timeout=5) as answer:
                answer.read()
        except (urllib.error.URLError, OSError) as exc:
            log.warning("demo traffic: %s", exc)


def _matrix_keys(account: str, interval: str, healthy: bool) -> dict[str, Any]:
    return {
        "token": "demo-token",
        "ingest_token": f"ingest-{account}",
        "interval": interval,  # D7's own default (5s) ignores defaults.interval
        "retry_first": "0.5s",  # the handed-in id is due at the next cycle
        "retry_max": "1s",  # and at every cycle after a failure
    }


KIT = Kit(
    name="d7",
    simulator=D7Simulator,
    quick={"index_delay": 0},
    probe=Probe(
        endpoint="report",
        method="GET",
        path="/whatsapp/v2/report/00000000-0000-4000-8000-000000000000",
        headers={"Authorization": "Bearer demo-token"},
        ready=lambda sim: f"/whatsapp/v2/report/{sim.send()}",
        misshapen=lambda body: not isinstance(body["messages"], list),
    ),
    demo=Demo(
        options={},
        accounts=_demo_accounts,
        metric="whatsapp_messages_total",
        traffic=_demo_traffic,
    ),
    faults=FaultAnswers(
        auth=(
            401,
            "application/json",
            {
                "detail": {
                    "code": "ACCESS_TOKEN_SIGNATURE_VERIFICATION_FAILED",
                    "message": "It looks like your requested access token is invalid. Please "
                    "check your access token and try again.",
                }
            },
        ),
        rate_limited={
            "detail": {"code": "TOO_MANY_REQUESTS", "message": "Too many requests. Slow down."}
        },
        # FastAPI's, which is not D7's "request id not indexed yet"
        not_found=lambda method, path: {"detail": "Not Found"},
        valid={
            "report": {
                "request_id": "f44e3f43-6d4e-4e46-becd-21993f3dcb8e",
                "messages": [
                    {
                        "msg_id": "6d29d646-4e09-11ee-84f4-0242ac190006",
                        "originator": "9190615xxxx",
                        "recipient": "+9190617xxxx",
                        "conversation_type": "marketing",
                        "message_type": "TEMPLATE",
                        "status": "read",
                    }
                ],
                "request_stage": "processed",
                "schedule_time": None,
            }
        },
        # `messages` an object where the list belongs
        wrong_shape=lambda junk: {"request_id": "\ud800", "messages": junk, "request_stage": -1},
    ),
    matrix=Matrix(prefix="d7", endpoints=("report",), keys=_matrix_keys, hand_in=True),
    example=Example(
        account="prod",
        env={"D7_INGEST_TOKEN": "i", "D7_WEBHOOK_SECRET": "0123456789abcdef"},
        files={"/run/secrets/d7": "d7-token"},
    ),
    dashboard="whatsapp-d7-delivery",
    alerts=("WhatsAppD7DeliveredRatioLow", "WhatsAppD7PendingGrowing"),
)
